"""End to end on the lab: a lost droplet back to a verified server with ``gpufleet rebuild``.

The lab of conftest.py (the real vLLM). The host rebuilt is its third good host (``h100:base``:
a bare GPU image, so the deploy installs docker too): the emulator's rebuild really wipes it
(a fresh root filesystem and a new SSH host key, as DigitalOcean's does), and its weights come
back from a healthy peer.
"""

from __future__ import annotations

import json

import pytest

from gpufleet.fleet.known_hosts import HostKey, names_address
from tests.e2e.conftest import API, GOOD
from tests.e2e.lab import Converged, Lab
from tests.e2e.test_deploy import chat
from tests.e2e.test_preflight import host_bytes
from tests.e2e.test_rollout import gpufleet, host_releases

NAME = GOOD[2]


def _entries(text: str, addresses: list[str], mine: bool) -> list[str]:
    return [ln for ln in text.splitlines() if names_address(ln, addresses) == mine]


@pytest.fixture
def rebuildable(first_deploy: Converged) -> Converged:
    """The host to rebuild as the first deploy left it, and another good host serving (the
    peer its weights come from; on whichever release the tests before left it)."""
    first_deploy.restore([NAME])
    others = [n for n in GOOD if n != NAME]
    if not any(first_deploy.lab.fingerprint(n).serving for n in others):
        first_deploy.restore(others[:1])
    return first_deploy


def test_rebuild_brings_a_wiped_droplet_back_on_the_same_release(lab: Lab,
                                                                 rebuildable: Converged,
                                                                 monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", API)  # the first deploy's key: the same release
    host = lab.host(NAME)
    addresses = [host.public_ip, host.private_ip]
    before = host_releases(lab)[NAME]["current"]
    assert before
    lab.ssh(NAME, "touch /root/marker-before-rebuild")
    known_before = lab.cfg.known_hosts.read_text()
    hub_before = host_bytes(lab, NAME)

    run = gpufleet(lab, "rebuild", "inventories/do.py", NAME, "--yes", timeout=900)
    assert run.returncode == 0, run.output[-4000:]

    # wiped for real: a file made before the rebuild is gone
    assert lab.ssh(NAME, "test -e /root/marker-before-rebuild", check=False).returncode == 1
    # known_hosts: exactly the droplet's new key, every other entry as it was
    key_type, key_b64 = (lab.host_root(NAME) / "merged/etc/ssh/ssh_host_ed25519_key.pub"
                         ).read_text().split()[:2]
    known_after = lab.cfg.known_hosts.read_text()
    assert _entries(known_after, addresses, True) == [f"{','.join(addresses)} {key_type} {key_b64}"]
    assert _entries(known_after, addresses, False) == _entries(known_before, addresses, False)
    assert HostKey(key_type, key_b64).fingerprint in run.output
    assert lab.cfg.known_hosts.with_name(lab.cfg.known_hosts.name + ".old").read_text() \
        == known_before
    # the weights came from a healthy peer over the private network, not one byte from the Hub
    assert "is offered as the peer" in run.output and host_bytes(lab, NAME) == hub_before
    staged = lab.ssh(NAME, "cat /opt/models/hub/models--*/.gpufleet/*.complete").stdout
    assert json.loads(staged)["bytes"] > 0
    # the same server: the same release, as the rollout's `releases` shows it, and it answers
    assert host_releases(lab)[NAME]["current"] == before
    assert chat(host.public_ip)["choices"]
    # the recovery time, phase by phase
    table = run.output[run.output.index("\nhost "):]
    for phase in ("api action", "boot to ssh", "toolkit and docker", "image pull", "weights",
                  "cold start", "verification", "recovery"):
        assert phase in table, table
    assert "rebuild completed (exit 0)" in run.output
