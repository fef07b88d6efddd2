"""Weights from a peer: the peer's server (``weights_peer.py``, started over stdin as the controller
starts it) and the stager asking it first, against the Hub emulator; a peer that lacks a file,
lies or is gone costs a download from the Hub, never a bad file."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from gpufleet.fleet import run_lock
from tests.unit.test_stage_weights import MODEL, hub_server, manifest, stage_weights, stats

assert hub_server  # a fixture
TOKEN = "peer-token-0123456789abcdef"


class PeerProcess:
    """``python3 -c BOOT serve ...`` with weights_peer.py on stdin, then ``TOKEN``."""

    def __init__(self, models: Path, commit: str, token: str = TOKEN) -> None:
        from gpufleet.deploy.weight_peers import script

        repo = stage_weights.repo_dir(str(models), MODEL)
        args = ["serve", "--repo-dir", repo, "--bind", "127.0.0.1", "--port", "0",
                "--marker", stage_weights.marker_path(str(models), MODEL, commit)]
        self.proc = subprocess.Popen(["python3", "-I", "-S", "-c", run_lock._BOOT, *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        body = script()
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(f"{len(body)}\n{body}TOKEN {token}\n")
        self.proc.stdin.flush()
        self.line = self.proc.stdout.readline().strip()
        self.url = "http://" + self.line.split(" ", 1)[1] if self.line.startswith("SERVING") \
            else ""

    def stop(self) -> str:
        assert self.proc.stdin and self.proc.stderr
        self.proc.stdin.close()
        assert self.proc.wait(timeout=10) == 0
        return self.proc.stderr.read()


@pytest.fixture
def seeded(hub_server, tmp_path):
    """A peer host's model store, staged from the Hub."""
    from gpufleet_lab import hub_emulator as he

    seed = tmp_path / "seed"
    seed.mkdir()
    m = manifest(hub_server, "main")
    assert stage_weights.stage(m, he.base_url(hub_server), he.GOOD_TOKEN, str(seed)) == 0
    return seed, m


def stage_via(peer: PeerProcess, hub_server, m: dict, dest: Path) -> tuple[int, int, str]:
    """Stage ``m`` into a fresh ``dest`` asking ``peer`` first: (exit code, bytes the Hub
    served, what the peer said as it stopped)."""
    from gpufleet_lab import hub_emulator as he

    dest.mkdir()
    before = stats(hub_server)["total_bytes"]
    try:
        rc = stage_weights.stage(m, he.base_url(hub_server), he.GOOD_TOKEN, str(dest),
                                 peer={"url": peer.url, "token": TOKEN})
    finally:
        served = peer.stop()
    return rc, stats(hub_server)["total_bytes"] - before, served


def test_a_new_host_takes_every_file_from_the_peer_and_none_from_the_hub(hub_server, seeded,
                                                                         tmp_path, capsys):

    seed, m = seeded
    peer = PeerProcess(seed, m["commit"])
    assert peer.line.startswith("SERVING 127.0.0.1:"), peer.line
    new = tmp_path / "new"
    rc, from_hub, served = stage_via(peer, hub_server, m, new)
    assert rc == 0 and from_hub == 0  # not one byte from the Hub
    size = sum(f["size"] for f in m["files"])
    assert served.split() == ["SERVED", str(size), str(len(m["files"]))]
    out = capsys.readouterr().out
    assert "downloaded 0 B (0 bytes) from the Hub, " in out and f"({size} bytes) from peer" in out
    # the same layout as from the Hub: the blobs are the seed's, file for file
    for f in m["files"]:
        name = f.get("sha256") or f["blob_id"]
        rel = Path("hub") / f"models--{MODEL.replace('/', '--')}" / "blobs" / name
        assert (new / rel).read_bytes() == (seed / rel).read_bytes()
    assert Path(stage_weights.marker_path(str(new), MODEL, m["commit"])).is_file()


def test_the_peer_serves_only_with_its_token_and_only_complete_blobs(seeded):
    seed, m = seeded
    peer = PeerProcess(seed, m["commit"])
    blob = next(f.get("sha256") or f["blob_id"] for f in m["files"])
    try:
        for headers, code in (({}, 401), ({"Authorization": "Bearer wrong"}, 401),
                              ({"Authorization": f"Bearer {TOKEN}"}, 200)):
            req = urllib.request.Request(f"{peer.url}/blobs/{blob}", headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    assert r.status == code
            except urllib.error.HTTPError as e:
                assert e.code == code
        for path in ("/blobs/../../etc/passwd", "/blobs/" + "0" * 64, "/refs/main"):
            req = urllib.request.Request(peer.url + path,
                                         headers={"Authorization": f"Bearer {TOKEN}"})
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=5)
            assert e.value.code == 404
    finally:
        peer.stop()
    # a commit that is not staged completely is not served at all
    other = PeerProcess(seed, "f" * 40)
    assert other.line.startswith("ERROR the weights are not staged completely"), other.line
    assert other.proc.wait(timeout=10) == 1


def test_what_the_peer_lacks_or_gets_wrong_comes_from_the_hub(hub_server, seeded, tmp_path,
                                                              capsys):

    seed, m = seeded
    repo = Path(stage_weights.repo_dir(str(seed), MODEL))
    lfs = next(f for f in m["files"] if f.get("sha256"))
    small = next(f for f in m["files"] if not f.get("sha256"))
    (repo / "blobs" / lfs["sha256"]).unlink()  # the peer lacks the big file
    bad = repo / "blobs" / small["blob_id"]
    bad.write_bytes(b"x" * small["size"])  # and lies about a small one
    peer = PeerProcess(seed, m["commit"])
    new = tmp_path / "new"
    rc, from_hub, _ = stage_via(peer, hub_server, m, new)
    assert rc == 0 and from_hub == lfs["size"] + small["size"]
    err = capsys.readouterr().err
    assert f"{lfs['path']}: peer {peer.url}" in err and "asking the Hub" in err
    assert f"{small['path']}: peer {peer.url} sent bytes that do not match" in err
    blob = new / "hub" / f"models--{MODEL.replace('/', '--')}" / "blobs" / small["blob_id"]
    assert stage_weights.git_blob_id(str(blob)) == small["blob_id"]


def test_a_peer_that_is_gone_sends_the_stager_to_the_hub(hub_server, tmp_path):
    from gpufleet_lab import hub_emulator as he

    m = manifest(hub_server, "main")
    new = tmp_path / "new"
    new.mkdir()
    before = stats(hub_server)["total_bytes"]
    rc = stage_weights.stage(m, he.base_url(hub_server), he.GOOD_TOKEN, str(new),
                             sleep=lambda s: None,
                             peer={"url": "http://127.0.0.1:9", "token": TOKEN})
    assert rc == 0
    assert stats(hub_server)["total_bytes"] - before == sum(f["size"] for f in m["files"])


def test_the_peer_file_is_read_once_and_removed(tmp_path):
    path = tmp_path / "peer.json"
    path.write_text(json.dumps({"url": "http://10.0.0.2:8790", "token": TOKEN, "peer": "a"}))
    os.chmod(path, 0o600)
    assert stage_weights.read_peer(str(path)) == {"url": "http://10.0.0.2:8790", "token": TOKEN}
    assert not path.exists()
    assert stage_weights.read_peer(str(path)) is None  # gone: the Hub serves
    path.write_text("not json")
    assert stage_weights.read_peer(str(path)) is None and not path.exists()


class StubHost:
    def __init__(self, name: str, private_ip: str | None = "10.0.0.1") -> None:
        self.name, self.data = name, {"private_ip": private_ip} if private_ip else {}


@pytest.fixture
def peers():
    from gpufleet.deploy import weight_peers

    weight_peers.close_all()
    yield weight_peers
    weight_peers.close_all()


def test_the_first_host_that_needs_the_weights_goes_to_the_hub_and_serves_the_rest(peers):
    state, what = object(), ("m/x", "c" * 40, "/opt/models")
    a, b, c = StubHost("a"), StubHost("b"), StubHost("c")
    assert peers.peer_for(state, a, *what, staged_here=False, can_serve=True) is None
    assert peers.peer_for(state, b, *what, staged_here=False, can_serve=True).name == "a"
    assert peers.peer_for(state, c, *what, staged_here=True, can_serve=True) is None
    # another run (a rollout's next batch, its preflight) picks its own
    assert peers.peer_for(object(), c, *what, staged_here=True, can_serve=True) is None
    assert peers.peer_for(object(), b, *what, staged_here=False, can_serve=True) is None


def test_a_host_that_has_them_serves_and_one_that_cannot_is_no_peer(peers):
    state, what = object(), ("m/x", "c" * 40, "/opt/models")
    refused, bare, staged = StubHost("r"), StubHost("n", None), StubHost("s")
    assert peers.peer_for(state, refused, *what, staged_here=False, can_serve=False) is None
    assert peers.peer_for(state, bare, *what, staged_here=False, can_serve=True) is None
    assert peers.peer_for(state, staged, *what, staged_here=True, can_serve=True) is None
    assert peers.peer_for(state, StubHost("new"), *what, staged_here=False,
                          can_serve=True).name == "s"


def test_an_offered_peer_serves_every_run_and_the_hub_serves_nobody(peers):
    offered = StubHost("healthy")
    peers.offer(object(), offered)
    what = ("m/x", "c" * 40, "/opt/models")
    one = peers.peer_for(object(), StubHost("rebuilt"), *what, staged_here=False,
                         can_serve=True)
    two = peers.peer_for(object(), StubHost("other"), *what, staged_here=False, can_serve=True)
    assert one is two and one.name == "healthy"  # one server for all of them
