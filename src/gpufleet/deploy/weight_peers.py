"""Weights fetched once per fleet: a host that has the model takes it to its peers.

When a deploy is defined for a host that does not have the weights yet, it gets one of:

* **a peer**: a host of this run that has them already, or that stages them from the Hub in an
  operation before this one (pyinfra runs an operation on every host before the next), or a
  host an orchestrator offers (``gpufleet rebuild`` offers a healthy host outside the run,
  :func:`offer`). The peer serves its complete blobs on its private (VPC) address with
  ``hostscripts/weights_peer.py``, started over the peer's own SSH connection when the first
  host asks, for as long as this run lives, behind a bearer token made for this run. The host's
  stager asks it first and verifies every file against the manifest (``stage_weights.py``).
* **the Hub**, when it is the first such host (pyinfra defines the hosts' deploys in parallel:
  the first to get here; it becomes the peer of the hosts after it), or when no host of the run
  can serve (no private address, a host that fails its checks).

The peer's token reaches the asking host as a root-only file, written only once the peer
serves (so a peer that cannot serve costs nothing: the stager goes to the Hub at once).
"""

from __future__ import annotations

import atexit
import json
import posixpath
import secrets as pysecrets
import shlex
import threading
from dataclasses import dataclass, field
from importlib import resources
from io import StringIO
from typing import Any

from pyinfra.api import State
from pyinfra.api.host import Host

from gpufleet.facts.weights import marker_path
from gpufleet.fleet import run_lock
from gpufleet.model import names
from gpufleet.model.secrets import Secret

PORT = names.WEIGHT_PEER_PORT  # the peer's port on its private address (the firewall opens it)


def script() -> str:
    return resources.files("gpufleet.hostscripts").joinpath("weights_peer.py").read_text("utf-8")


def private_address(host: Host) -> str | None:
    value = host.data.get("private_ip")
    return str(value) if value else None


@dataclass
class PeerServer:
    """A peer's server, alive while its channel is open."""

    url: str
    _stdin: Any = field(repr=False)
    _close: Any = field(repr=False)

    def __post_init__(self) -> None:
        self._done = run_lock.keep_alive(self._stdin, "gpufleet-weights-peer")

    def close(self) -> None:
        self._done.set()
        self._close()


@dataclass
class Peer:
    """A host that serves (or will serve) one model at one commit to the hosts of a run."""

    state: State
    host: Host
    model: str
    commit: str
    models_dir: str
    token: Secret = field(default_factory=lambda: Secret(pysecrets.token_urlsafe(32)))
    server: PeerServer | None = None
    failed: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def name(self) -> str:
        return self.host.name

    def serving(self) -> str | None:
        """The peer's URL once it serves (started on the first call); None if it cannot."""
        with self._lock:
            if self.server is None and self.failed is None:
                self.server, self.failed = _start(self)
            return self.server.url if self.server else None


def _start(peer: Peer) -> tuple[PeerServer | None, str | None]:
    address = private_address(peer.host)
    if address is None:
        return None, "no private address"
    marker = marker_path(peer.models_dir, peer.model, peer.commit)  # <repo>/.gpufleet/<commit>
    args = ["serve", "--repo-dir", posixpath.dirname(posixpath.dirname(marker)), "--bind",
            address, "--port", str(PORT), "--marker", marker]
    try:
        opened = run_lock.open_channel(peer.state, peer.host, args, body=script())
        if opened is None:
            return None, "its connector cannot serve"
        stdin, stdout, close, _settimeout = opened
        stdin.write(f"TOKEN {peer.token.reveal()}\n")
        stdin.flush()
        line = str(stdout.readline()).strip()
    except Exception as e:  # noqa: BLE001 - a peer that cannot serve sends the host to the Hub
        return None, str(e)
    verb, _, rest = line.partition(" ")
    if verb != "SERVING":
        close()
        return None, rest or "no answer"
    server = PeerServer(f"http://{rest}", stdin, close)
    _SERVERS.append(server)
    return server, None


_SERVERS: list[PeerServer] = []
# (the run's state, model, commit, models_dir) -> its peer: each pyinfra state (a rollout's
# preflight, each batch) picks its own; a peer offered from outside serves them all
_PEERS: dict[tuple[int, str, str, str], Peer] = {}
_OFFERED: list[tuple[State, Host]] = []  # at most one: the host a rebuild offers
_OFFERED_PEERS: dict[tuple[str, str, str], Peer] = {}


def offer(state: State, host: Host) -> None:
    """Offer ``host`` (connected in ``state``, outside the deploy's run) as the peer of the hosts
    that need weights (a rebuild offers a healthy host of the service)."""
    _OFFERED.append((state, host))


def close_all() -> None:
    """End every peer's server and forget the run's peers and offers."""
    for server in list(_SERVERS):
        server.close()
    _SERVERS.clear()
    _PEERS.clear()
    _OFFERED.clear()
    _OFFERED_PEERS.clear()


atexit.register(close_all)


def peer_for(state: State, host: Host, model: str, commit: str, models_dir: str,
             staged_here: bool, can_serve: bool) -> Peer | None:
    """Called as the deploy is defined for ``host``: the peer it should ask, or None (it has
    the weights, or it goes to the Hub, and then it is the peer of the hosts after it).

    ``staged_here``: ``host`` has the weights already; ``can_serve``: ``host`` passed the checks
    known when the deploy is defined (a host refused by its plan never stages)."""
    what = (model, commit, models_dir)
    key = (id(state), *what)
    peer = _PEERS.get(key)
    if peer is None and _OFFERED:
        offered_state, offered = _OFFERED[0]
        if what not in _OFFERED_PEERS:
            _OFFERED_PEERS[what] = Peer(offered_state, offered, *what)
        peer = _PEERS[key] = _OFFERED_PEERS[what]
    if peer is not None and peer.name != host.name and not staged_here:
        return peer
    if peer is None and can_serve and private_address(host) is not None:
        _PEERS[key] = Peer(state, host, *what)
    return None


def hand_over(state: State, host: Host, peer: Peer, path: str) -> bool:
    """Run as the staging operation runs on ``host`` (a pyinfra FunctionCommand): start the
    peer's server if it is not up, then write its URL and token to ``path`` on ``host``
    (0600). Always true: without a peer, the stager finds no file and goes to the Hub."""
    url = peer.serving()
    if url is None:
        host.log(f"weights: peer {peer.name} cannot serve ({peer.failed}); the Hub serves")
        return True
    from gpufleet.fleet.session import connector_args

    doc = json.dumps({"url": url, "token": peer.token.reveal(), "peer": peer.name})
    args = connector_args(state, host)
    tmp = f"{path}.gpufleet-new"  # in the 0700 secrets directory the env file's operation made
    if host.put_file(StringIO(doc), tmp, print_output=False, **args):
        host.run_shell_command(f"chmod 600 {shlex.quote(tmp)} && mv -f {shlex.quote(tmp)} "
                               f"{shlex.quote(path)}", print_output=False, **args)
    host.log(f"weights: from peer {peer.name} ({url}), the Hub for what it lacks")
    return True
