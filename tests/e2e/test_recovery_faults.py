"""``gpufleet rebuild`` when things go wrong, on its own lab (prefix rf, subnet 10.224.0).

Two H100 hosts that serve (the stand-in vLLM: these faults are the API's and the host's, not the
engine's) and a host without an NVIDIA driver, whose deploy always fails its GPU check: a host
already out of service, the one the faults that wipe a host are tried on. The DigitalOcean
emulator's knobs inject the API's faults (``/_lab/actions``, ``/_lab/ratelimit``). Each fault is
one clear error with what to do next, and nothing else changes: the serving hosts are never
touched, and known_hosts changes only for a droplet whose new key was read.

Last, on the same lab: a golden snapshot of a serving host (``gpufleet snapshot``) and a rebuild
from it, which only writes the secrets back and starts the server.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request

import pytest

from gpufleet.fleet.known_hosts import names_address
from tests.e2e.lab import BIN, ROOT, Converged, Lab, converge, start_lab
from tests.e2e.test_deploy import chat
from tests.e2e.test_preflight import host_bytes
from tests.e2e.test_rollout import _env, gpufleet, host_releases

PREFIX, SUBNET = "rf", "10.224.0"
SERVING = ["llama3-gpu-01", "llama3-gpu-02"]
BROKEN = "llama3-gpu-03"  # no NVIDIA driver: its deploy fails at the GPU check
API = "sk-rf-faults-0123456789abcdef"


@pytest.fixture(scope="module")
def rf_lab():
    from gpufleet_lab import manager

    lab: Lab = start_lab(PREFIX, SUBNET, ["h100", "h100", "nodriver"])
    try:
        yield lab
    finally:
        manager.down(lab.cfg)


@pytest.fixture(scope="module")
def fleet(rf_lab: Lab) -> Converged:
    return converge(rf_lab, SERVING, extra_env={"HF_TOKEN": rf_lab.env["HF_TOKEN"],
                                                "VLLM_API_KEY": API})


@pytest.fixture
def env(monkeypatch, fleet: Converged) -> Converged:
    monkeypatch.setenv("VLLM_API_KEY", API)
    return fleet


def knob(lab: Lab, path: str, body: dict) -> dict:
    req = urllib.request.Request(
        lab.env["DIGITALOCEAN_API_URL"] + path, data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Bearer {lab.env['DIGITALOCEAN_TOKEN']}",
                 "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def rebuild(lab: Lab, *args: str):
    return gpufleet(lab, "rebuild", "inventories/do.py", "--yes", *args, timeout=600)


def entries(lab: Lab, name: str) -> list[str]:
    host = lab.host(name)
    return [ln for ln in lab.cfg.known_hosts.read_text().splitlines()
            if names_address(ln, [host.public_ip, host.private_ip])]


def serving_untouched(fleet: Converged) -> None:
    for name in SERVING:
        assert fleet.lab.fingerprint(name) == fleet.prints[name], name


def test_the_last_healthy_hosts_are_not_rebuilt_without_force(rf_lab, env):
    known = rf_lab.cfg.known_hosts.read_text()
    run = rebuild(rf_lab, *SERVING)
    assert run.returncode == 2, run.output
    assert "last healthy host" in run.output and "--force" in run.output
    assert "Traceback" not in run.output
    assert rf_lab.cfg.known_hosts.read_text() == known
    serving_untouched(env)
    run = gpufleet(rf_lab, "drill", "inventories/do.py", BROKEN, "--yes")
    assert run.returncode == 2, run.output
    assert f"{BROKEN} is not healthy: a drill times the recovery of a serving host" in run.output
    serving_untouched(env)


def test_an_api_action_that_errors_changes_nothing(rf_lab, env):
    name = SERVING[0]
    rf_lab.ssh(name, "touch /root/before")
    known = rf_lab.cfg.known_hosts.read_text()
    knob(rf_lab, "/_lab/actions", {"outcome": "errored"})
    run = rebuild(rf_lab, name, "--force")
    assert run.returncode == 1, run.output
    assert "errored" in run.output and "DigitalOcean console" in run.output
    assert f"run gpufleet rebuild again for {name}" in run.output
    assert rf_lab.cfg.known_hosts.read_text() == known
    rf_lab.ssh(name, "test -e /root/before && rm /root/before")  # not wiped
    serving_untouched(env)


def test_an_api_action_that_never_finishes_times_out_and_changes_nothing(rf_lab, env):
    name = SERVING[0]
    known = rf_lab.cfg.known_hosts.read_text()
    knob(rf_lab, "/_lab/actions", {"outcome": "errored", "hold": 8})
    t0 = time.monotonic()
    run = rebuild(rf_lab, name, "--force", "--action-timeout", "2")
    assert run.returncode == 1, run.output
    assert "still in-progress after 2s" in run.output
    assert rf_lab.cfg.known_hosts.read_text() == known
    serving_untouched(env)
    time.sleep(max(0.0, 9 - (time.monotonic() - t0)))  # the held action ends (errored)


def test_ssh_that_never_comes_back_is_one_error_and_known_hosts_is_kept(rf_lab, env):
    before = entries(rf_lab, BROKEN)
    knob(rf_lab, "/_lab/actions", {"outcome": "no_boot"})
    run = rebuild(rf_lab, BROKEN, "--ssh-timeout", "8")
    assert run.returncode == 1, run.output
    host = rf_lab.host(BROKEN)
    assert f"no SSH on {host.public_ip}:22 within 8s" in run.output
    assert "recovery console" in run.output
    assert entries(rf_lab, BROKEN) == before
    serving_untouched(env)


def test_a_deploy_that_fails_after_the_rebuild_says_how_to_finish(rf_lab, env):
    """The host left off by the test before is rebuilt (and booted); its deploy then fails at
    the GPU check. The API first answers 429 twice: the client waits as ``retry-after`` says."""
    knob(rf_lab, "/_lab/ratelimit", {"count": 2, "retry_after": 1})
    run = rebuild(rf_lab, BROKEN)
    assert run.returncode == 1, run.output
    assert "the deploy after the rebuild failed" in run.output
    assert f"pyinfra inventories/do.py deploys/llama3.py --limit {BROKEN}" in run.output
    assert "NVIDIA" in run.output
    # the new key was read after the rebuild: SSH to the host works with strict checking
    host = rf_lab.host(BROKEN)
    key = (rf_lab.host_root(BROKEN) / "merged/etc/ssh/ssh_host_ed25519_key.pub").read_text()
    assert entries(rf_lab, BROKEN) == [f"{host.public_ip},{host.private_ip} "
                                       f"{' '.join(key.split()[:2])}"]
    rf_lab.ssh(BROKEN, "true")
    serving_untouched(env)


# -- golden snapshots ----------------------------------------------------------------------------


def gpufleet_json(lab: Lab, *args: str) -> tuple[int, dict, str]:
    proc = subprocess.run([str(BIN / "gpufleet"), *args, "--json"], cwd=ROOT, env=_env(lab),
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, json.loads(proc.stdout or "{}"), proc.stderr


def test_a_snapshot_whose_api_action_errors_leaves_the_host_serving(rf_lab, env):
    name = SERVING[1]
    knob(rf_lab, "/_lab/actions", {"outcome": "errored"})  # the power-off
    rc, doc, log = gpufleet_json(rf_lab, "snapshot", "inventories/do.py", name)
    assert rc == 1, log
    assert "errored" in doc["message"] and "it serves again" in doc["message"], doc
    assert "Traceback" not in log
    assert chat(rf_lab.host(name).public_ip, API)["choices"]
    assert doc["snapshot"]["snapshot_id"] is None


def test_a_golden_snapshot_leaves_the_secrets_out_and_a_rebuild_from_it_only_starts(rf_lab,
                                                                                     env):
    from gpufleet_lab import hosts as lab_hosts

    gold, lost = SERVING
    release = host_releases(rf_lab)[gold]["current"]
    rc, doc, log = gpufleet_json(rf_lab, "snapshot", "inventories/do.py", gold, "--name", "gold")
    assert rc == 0, log + json.dumps(doc, indent=1)
    snap = doc["snapshot"]
    assert snap["name"] == "gold" and snap["size_gigabytes"] > 0
    assert snap["scrubbed"] == ["/etc/gpufleet/llama3.env", "/etc/gpufleet/llama3.hf-token",
                                "/etc/gpufleet/llama3.front-keys.conf",
                                "/etc/gpufleet/llama3.tls.key"]
    phases = doc["hosts"][0]["phases"]
    assert list(phases)[:4] == ["scrub", "power off", "snapshot", "power on"], phases
    # what the snapshot holds: the staged weights and the pulled image, no secret anywhere
    disk = lab_hosts.snapshot_dir(rf_lab.cfg, snap["snapshot_id"])
    assert any((disk / "upper/opt/models/hub").iterdir())
    assert any((disk / "docker/image").iterdir())
    assert not (disk / "upper/etc/gpufleet/llama3.env").exists()
    for secret in (API, rf_lab.env["HF_TOKEN"]):
        found = subprocess.run(["grep", "-rlF", secret, str(disk)], capture_output=True,
                               text=True)
        assert found.returncode == 1 and not found.stdout, found.stdout
    # the snapshotted host serves again, on its release, its secrets back (0600)
    assert host_releases(rf_lab)[gold]["current"] == release
    assert chat(rf_lab.host(gold).public_ip, API)["choices"]
    assert rf_lab.ssh(gold, "stat -c %a /etc/gpufleet/llama3.env").stdout.strip() == "600"
    listed = gpufleet(rf_lab, "snapshots", "inventories/do.py")
    assert f"{snap['snapshot_id']} " in listed.output and "gold" in listed.output

    # a rebuild from it: nothing pulled, nothing downloaded, the same release serving
    hub_before = host_bytes(rf_lab, lost)
    rc, doc, log = gpufleet_json(rf_lab, "rebuild", "inventories/do.py", lost, "--yes",
                                 "--snapshot", str(snap["snapshot_id"]))
    assert rc == 0, log + json.dumps(doc, indent=1)
    assert host_bytes(rf_lab, lost) == hub_before
    host = doc["hosts"][0]
    assert host["release_after"] == release and host["result"] == "rebuilt", host
    # only the secrets written back and the server started
    assert not [op for op in host["changed"] if op.startswith(("Image ", "Weights ", "Docker ",
                                                               "NVIDIA ", "daemon.json"))], host
    assert any(op.startswith("Env file") for op in host["changed"]), host
    assert any(op.startswith("Front: ") for op in host["changed"]), host  # its key check
    assert chat(rf_lab.host(lost).public_ip, API)["choices"]
    serving_untouched_but(env, lost)


def serving_untouched_but(fleet: Converged, rebuilt: str) -> None:
    for name in SERVING:
        if name != rebuilt:
            assert fleet.lab.fingerprint(name) == fleet.prints[name], name
