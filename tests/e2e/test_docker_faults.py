"""Faults on one lab host (prefix hc, subnet 10.223.0): a daemon.json docker refuses, a host
lost in the middle of a deploy.

Each test starts from the host as the first deploy left it (``deployed``: redeployed when a
test before changed it): docker started with a flag that conflicts with a key the merge owns
(docker 20.10 has no ``dockerd --validate``, and no version validates against its unit's flags);
the host powered off, then cut off the network, while the deploy waits for its endpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from gpufleet_lab import hosts as lab_hosts
from tests.e2e.lab import BIN, ROOT, Converged, Lab, converge, start_lab, strip_ansi

PREFIX, SUBNET = "hc", "10.223.0"
NAME = "llama3-gpu-01"
API = "sk-hc-faults-0123456789abcdef"
DAEMON_JSON = "/etc/docker/daemon.json"
CONFLICT = ("the following directives are specified both as a flag and in the configuration "
            "file: default-runtime")


@pytest.fixture(scope="module")
def hc_lab():
    from gpufleet_lab import manager

    lab: Lab = start_lab(PREFIX, SUBNET, ["h100"])
    try:
        yield lab
    finally:
        subprocess.run(["ip", "link", "set", lab.cfg.veth(1), "up"], capture_output=True)
        manager.down(lab.cfg)


def secrets(lab: Lab) -> dict[str, str]:
    return {"HF_TOKEN": lab.env["HF_TOKEN"], "VLLM_API_KEY": API}


@pytest.fixture(scope="module")
def first_deploy(hc_lab: Lab) -> Converged:
    return converge(hc_lab, [NAME], extra_env=secrets(hc_lab))


@pytest.fixture
def deployed(first_deploy: Converged) -> Converged:
    first_deploy.restore()
    return first_deploy


def health(lab: Lab, timeout: float = 60) -> int:
    """/health of the container, asked on the host itself."""
    deadline = time.monotonic() + timeout
    code = "000"
    while time.monotonic() < deadline:
        code = lab.ssh(NAME, "curl -s -o /dev/null -w '%{http_code}' "
                             "http://127.0.0.1:8000/health", check=False).stdout.strip()
        if code == "200":
            break
        time.sleep(1)
    return int(code or 0)


def test_first_deploy(hc_lab, first_deploy, deployed):
    run = first_deploy.first_run
    assert run.returncode == 0, run.output[-3000:]
    assert health(hc_lab) == 200


def test_daemon_json_docker_refuses_is_put_back_and_the_host_keeps_serving(hc_lab, deployed):
    lab = hc_lab
    # docker.service passes $DOCKER_OPTS from /etc/default/docker: a flag for a key the merge
    # owns makes docker refuse the merged file (it runs on, until the next restart)
    lab.ssh(NAME, "echo 'DOCKER_OPTS=\"--default-runtime=runc\"' > /etc/default/docker")
    # a key the merge owns goes missing: the deploy writes it back and restarts docker
    lab.ssh(NAME, f"python3 -c \"import json; p='{DAEMON_JSON}'; d=json.load(open(p)); "
                  "d.pop('default-runtime'); json.dump(d, open(p, 'w'))\"")
    before = lab.ssh(NAME, f"sha256sum {DAEMON_JSON}").stdout
    try:
        run = lab.pyinfra(extra_env=secrets(lab))
        out = strip_ansi(run.output)
        assert run.returncode == 1, out[-3000:]
        line = next((ln for ln in out.splitlines() if "docker did not start" in ln), "")
        assert f"[{NAME}]" in line and f"the new {DAEMON_JSON}" in line, out[-3000:]
        # docker's own journal line, naming the file and the key
        assert (f"unable to configure the Docker daemon with file {DAEMON_JSON}: "
                f"{CONFLICT}") in line, line
        assert f"restored the previous {DAEMON_JSON}" in line
        assert "docker is running again" in line and "re-run" in line
        assert "Job for docker.service failed" not in out
        # the previous file is in place, docker and the vLLM unit are back, it serves
        assert lab.ssh(NAME, f"sha256sum {DAEMON_JSON}").stdout == before
        assert "default-runtime" in lab.ssh(NAME, f"cat {DAEMON_JSON}.gpufleet-rejected").stdout
        assert lab.ssh(NAME, "systemctl is-active docker", check=False).stdout.strip() == "active"
        assert health(lab) == 200
        assert lab.ssh(NAME, "systemctl is-active gpufleet-llama3",
                       check=False).stdout.strip() == "active"
    finally:
        lab.ssh(NAME, "rm -f /etc/default/docker")
    # the conflict gone: the same run merges, restarts docker and converges
    run = lab.pyinfra(extra_env=secrets(lab))
    assert run.returncode == 0, run.output[-3000:]
    doc = json.loads(lab.ssh(NAME, f"cat {DAEMON_JSON}").stdout)
    assert doc["default-runtime"] == "nvidia"
    assert health(lab) == 200


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)


@pytest.mark.parametrize("how", ["power-off", "link-cut"])
def test_host_lost_mid_deploy_is_reported_with_operation_and_reason(hc_lab, deployed, tmp_path,
                                                                    how):
    lab = hc_lab
    log = tmp_path / f"{how}.log"
    # a new unit (slow cold start) so that the deploy waits for the endpoint
    cold = {"power-off": "31", "link-cut": "32"}[how]
    cmd = [str(BIN / "pyinfra"), "-y", "inventories/do.py", "deploys/llama3.py", "--data",
           f'container_env={{"VLLM_STANDIN_COLD_START_S":"{cold}"}}']
    env = {**os.environ, **lab.env, **secrets(lab), "COLUMNS": "200",
           "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                text=True)
    try:
        _wait_for(log, "Starting operation: vLLM service | Endpoint answers", proc)
        time.sleep(1)
        if how == "power-off":
            lab.ssh(NAME, "systemctl poweroff --force --force", check=False, timeout=20)
        else:
            subprocess.run(["ip", "link", "set", lab.cfg.veth(1), "down"], check=True)
        # without the watchdog a cut-off host hangs the run until the cold-start budget
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=60)
        if how == "link-cut":
            subprocess.run(["ip", "link", "set", lab.cfg.veth(1), "up"], check=True)
    text = strip_ansi(log.read_text())
    assert rc != 0, text[-3000:]
    line = next((ln for ln in text.splitlines() if "lost at operation" in ln), "")
    assert line.strip().startswith(
        f"{NAME}: lost at operation \"Endpoint answers at http://127.0.0.1:8000"), \
        text[-3000:]
    assert "the host did not answer on port 22 since " in line
    if how == "link-cut":  # the watchdog noticed: the SSH connection would hang
        assert "unreachable, no answer on its SSH port" in line
        assert "gpufleet closed its SSH connection" in line
    # back on: the host comes up and the next deploy converges
    if how == "power-off":
        lab_hosts.power_cycle_host(lab.cfg, 1)
    lab.wait_ssh(NAME)
    run = lab.pyinfra(extra_env=secrets(lab))
    assert run.returncode == 0, run.output[-3000:]
