"""``gpufleet rebuild`` when things go wrong, on its own lab (prefix rf, subnet 10.224.0).

Two H100 hosts that serve (the stand-in vLLM: these faults are the API's and the host's, not the
engine's) and a host without an NVIDIA driver, whose deploy always fails its GPU check: a host
already out of service, the one the faults that wipe a host are tried on. The DigitalOcean
emulator's knobs inject the API's faults (``/_lab/actions``, ``/_lab/ratelimit``). Each fault is
one clear error with what to do next, and nothing else changes: the serving hosts are never
touched, and known_hosts changes only for a droplet whose new key was read.
"""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from gpufleet.fleet.known_hosts import names_address
from tests.e2e.lab import Converged, Lab, converge, start_lab
from tests.e2e.test_rollout import gpufleet

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
