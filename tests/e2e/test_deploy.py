"""End to end on the lab: the user's command, unchanged, over real SSH, systemd, apt and docker.

One shared lab (see conftest.py). Each test starts from the state it names: ``first_deploy``
is the first deploy's run, ``deployed`` the good hosts as it left them (a test that changes a
host need not put it back: the next one that needs it gets it redeployed). Any test runs alone.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
import urllib.request

import pytest

from tests.e2e.conftest import API, GOOD


def chat(ip: str, key: str = API) -> dict:
    body = json.dumps({"model": "llama3-8b", "max_tokens": 8,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    req = urllib.request.Request(f"http://{ip}:8000/v1/chat/completions", data=body, headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def docker_started(lab, name: str) -> str:
    return lab.ssh(name, "systemctl show docker -p ActiveEnterTimestampMonotonic --value").stdout


def container_started(lab, name: str) -> str:
    return lab.ssh(name, "docker inspect -f '{{.State.StartedAt}}' gpufleet-llama3").stdout


def test_first_deploy_converges_good_hosts_and_fails_bad_ones_alone(lab, secrets, deployed):
    assert len(secrets["HF_TOKEN"]) > 40
    run = deployed.first_run
    assert run.returncode == 1, run.output[-3000:]  # some hosts failed, on purpose
    for name in GOOD:
        assert lab.ssh(name, "systemctl is-active gpufleet-llama3.service").stdout.strip() == "active"
        answer = chat(lab.host(name).public_ip)
        assert answer["choices"][0]["message"]["content"], answer
    expect = {
        "llama3-gpu-04": "nvidia-smi failed with exit code 9: NVIDIA-SMI has failed because it "
                         "couldn't communicate with the NVIDIA driver",
        "llama3-gpu-05": "no NVIDIA driver: nvidia-smi is not installed",
        "llama3-gpu-06": "Tesla T4 has compute capability 7.5, the service needs 8.9",
    }
    for name, needle in expect.items():
        lines = "\n".join(run.host_lines(name))
        assert f"gpufleet: {name}: " in lines and needle in lines, lines
        # failed before anything changed: no toolkit list, no unit
        assert lab.ssh(name, "test ! -e /etc/apt/sources.list.d/nvidia-container-toolkit.list "
                             "&& test ! -e /etc/systemd/system/gpufleet-llama3.service",
                       check=False).returncode == 0


def test_base_flavour_host_got_docker_installed_by_the_deploy(lab, deployed):
    out = lab.ssh("llama3-gpu-03", "dpkg-query -W -f '${Status}' docker.io").stdout
    assert "install ok installed" in out
    log = "\n".join(deployed.first_run.host_lines("llama3-gpu-03"))
    assert "apt-get install" in log and "docker.io" in log


def test_second_run_changes_nothing(lab, secrets, deployed):
    before = {n: (docker_started(lab, n), container_started(lab, n)) for n in GOOD}
    run = lab.pyinfra(*[a for n in GOOD for a in ("--limit", n)], extra_env=secrets)
    assert run.returncode == 0, run.output[-3000:]
    total = run.grand_total()
    # columns after the op count: hosts... we look at Success and Error being '-'
    assert "No changes" in run.output
    assert "Success" not in "\n".join(x for x in run.output.splitlines() if x.startswith("    ["))
    success, error = total[-3], total[-2]
    assert success == "-" and error == "-", total
    after = {n: (docker_started(lab, n), container_started(lab, n)) for n in GOOD}
    assert after == before  # docker not restarted, vLLM container not restarted


def test_daemon_json_keeps_the_hosts_keys_and_a_backup(lab, deployed):
    doc = json.loads(lab.ssh("llama3-gpu-01", "cat /etc/docker/daemon.json").stdout)
    assert doc["default-runtime"] == "nvidia"
    assert doc["runtimes"]["nvidia"]["path"] == "nvidia-container-runtime"
    # keys the droplet image had before gpufleet came
    assert doc["log-driver"] == "json-file" and doc["log-opts"]["max-size"] == "10m"
    assert doc["registry-mirrors"]
    backups = lab.ssh("llama3-gpu-01", "ls /etc/docker/").stdout
    assert "daemon.json.gpufleet-backup-" in backups
    info = lab.ssh("llama3-gpu-01", "docker info --format '{{.DefaultRuntime}}'").stdout.strip()
    assert info == "nvidia"


def test_broken_daemon_json_fails_the_host_and_is_left_untouched(lab, secrets, deployed):
    name = "llama3-gpu-02"
    lab.ssh(name, "cp -p /etc/docker/daemon.json /root/daemon.json.good && "
                  "printf '{\"debug\": true,,}\\n' > /etc/docker/daemon.json")
    broken = lab.ssh(name, "sha256sum /etc/docker/daemon.json").stdout
    docker_before = docker_started(lab, name)
    try:
        run = lab.pyinfra("--limit", name, extra_env=secrets)
        assert run.returncode == 1
        lines = "\n".join(run.host_lines(name))
        assert "/etc/docker/daemon.json is not valid JSON (line 1, column 16" in lines, lines
        assert lab.ssh(name, "sha256sum /etc/docker/daemon.json").stdout == broken
        assert docker_started(lab, name) == docker_before
    finally:
        lab.ssh(name, "cp -p /root/daemon.json.good /etc/docker/daemon.json")
    # restored: semantically the same, so nothing changes and docker is not restarted
    run = lab.pyinfra("--limit", name, extra_env=secrets)
    assert run.returncode == 0 and run.grand_total()[-3] == "-", run.output[-2000:]
    assert docker_started(lab, name) == docker_before


def test_docker_restarts_only_when_the_merge_changes_something(lab, secrets, deployed):
    name = "llama3-gpu-02"
    before = docker_started(lab, name)
    # a key the merge owns goes missing: the deploy restores it and restarts docker
    lab.ssh(name, "python3 -c \"import json; p='/etc/docker/daemon.json'; d=json.load(open(p)); "
                  "d.pop('default-runtime'); json.dump(d, open(p, 'w'))\"")
    run = lab.pyinfra("--limit", name, extra_env=secrets)
    assert run.returncode == 0, run.output[-2000:]
    assert docker_started(lab, name) != before
    assert lab.ssh(name, "docker info --format '{{.DefaultRuntime}}'").stdout.strip() == "nvidia"
    chat(lab.host(name).public_ip)  # vLLM came back after the docker restart


def test_reboot_brings_docker_and_vllm_back(lab, deployed):
    name = "llama3-gpu-01"
    lab.ssh(name, "systemctl reboot", check=False)
    time.sleep(3)
    lab.wait_ssh(name, timeout=120)
    uptime = float(lab.ssh(name, "cut -d' ' -f1 /proc/uptime").stdout)
    assert uptime < 120
    deadline = time.monotonic() + 120
    while True:
        try:
            chat(lab.host(name).public_ip)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)
    assert lab.ssh(name, "systemctl is-active docker gpufleet-llama3").stdout.split() == [
        "active", "active"]


def _grep_host_files(lab, name: str, needle: str) -> list[str]:
    """Files on the host's disk (rootfs overlay, docker and containerd dirs) containing needle."""
    root = lab.host_root(name)
    out = subprocess.run(["grep", "-rlaF", needle, str(root / "upper"), str(root / "docker"),
                          str(root / "containerd")], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if line]


@pytest.mark.parametrize("secret_name", ["HF_TOKEN", "VLLM_API_KEY"])
def test_secrets_appear_nowhere_but_the_env_file(lab, secrets, deployed, secret_name):
    secret = secrets[secret_name]
    # pyinfra output of the first deploy (-vv with --diff), and every other run on this lab
    assert deployed.first_run in lab.runs
    for i, run in enumerate(lab.runs):
        assert secret not in run.output, f"{secret_name} in the output of run {i}: {run.args}"
    # a run at the highest verbosity too
    loud = lab.pyinfra("-vvv", "--diff", "--limit", GOOD[0], extra_env=secrets)
    assert loud.returncode == 0 and secret not in loud.output
    for name in GOOD:
        ps = lab.ssh(name, "ps -eo args").stdout
        assert secret not in ps, f"{secret_name} in {name}'s process list"
        journal = lab.ssh(name, "journalctl --no-pager -o cat").stdout
        assert secret not in journal, f"{secret_name} in {name}'s journal"
        inspect = lab.ssh(name, "docker inspect gpufleet-llama3").stdout
        assert secret not in inspect, f"{secret_name} in docker inspect on {name}"
        # the API key only in the server's env file and the front's key check (both root-only),
        # the Hub token only in its own token file
        homes = {"HF_TOKEN": ("/etc/gpufleet/llama3.hf-token",),
                 "VLLM_API_KEY": ("/etc/gpufleet/llama3.env",
                                  "/etc/gpufleet/llama3.front-keys.conf")}[secret_name]
        files = _grep_host_files(lab, name, secret)
        assert [f for f in files if not f.endswith(homes)] == [], files
        mode = lab.ssh(name, "stat -c '%a %U %G' /etc/gpufleet/llama3.env "
                             "/etc/gpufleet/llama3.hf-token /etc/gpufleet/llama3.front-keys.conf "
                             "/etc/gpufleet").stdout
        assert mode.split("\n")[:4] == ["600 root root"] * 3 + ["700 root root"]
        sums = lab.ssh(name, "sha256sum /etc/gpufleet/llama3.env "
                             "/etc/gpufleet/llama3.hf-token").stdout.split()
        assert sums[0] == hashlib.sha256(f"VLLM_API_KEY='{API}'\n".encode()).hexdigest()
        assert sums[2] == hashlib.sha256(
            f"HF_TOKEN='{secrets['HF_TOKEN']}'\n".encode()).hexdigest()


def test_a_server_that_crashes_fails_the_host_with_its_last_log_lines(lab, secrets, deployed):
    """The real vLLM, given a tokenizer path that does not exist, fails at every start."""
    name = "llama3-gpu-02"
    run = lab.pyinfra("--limit", name, "--data", 'extra_args=["--tokenizer","/nonexistent"]',
                      "--data", "cold_start_timeout=240", extra_env=secrets)
    assert run.returncode == 1
    lines = "\n".join(run.host_lines(name))
    assert "vLLM keeps crashing" in lines or "did not answer 200" in lines, lines
    assert "Last log lines of gpufleet-llama3" in lines
    assert "/nonexistent" in lines  # the real server's own words
    # the next deploy of the good spec brings it back
    run = lab.pyinfra("--limit", name, extra_env=secrets)
    assert run.returncode == 0, run.output[-2000:]
    chat(lab.host(name).public_ip)
