"""Notice a host that stopped answering while a run waits on it, and cut it off.

A host powered off mid-command, or one whose link dropped, leaves its SSH command waiting on a
TCP connection nobody answers any more. The watchdogs (the rollout's, per batch, and the plain
deploy's in ``gpufleet.fleet.lost_hosts``) probe each host's SSH port; after a number of missed
probes in a row the host is lost and its SSH transport is closed, so that the running command
fails instead of hanging the whole run.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pyinfra.api.host import Host

Address = tuple[str, int]
Probe = Callable[[Address | None], bool]
T = TypeVar("T")

PROBE_INTERVAL = 2.0  # seconds between two rounds of probes
PROBE_MISSES = 3  # missed probes in a row after which a host is lost
PROBE_TIMEOUT = 2.0  # seconds one probe waits for the SSH port
ROUND_TIMEOUT = 30.0  # seconds one round of probes over many hosts may take


def ssh_address(host: Host) -> Address | None:
    """Where the host's SSH server is (None: not an SSH host, nothing to probe)."""
    if getattr(getattr(host, "connector_cls", None), "__name__", "") != "SSHConnector":
        return None
    return (str(host.data.get("ssh_hostname") or host.name), int(host.data.get("ssh_port") or 22))


def tcp_probe(address: Address | None, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether something accepts a TCP connection at ``address`` (None always answers)."""
    if address is None:
        return True
    try:
        socket.create_connection(address, timeout=timeout).close()
        return True
    except OSError:
        return False


def host_answers(host: Host) -> bool:
    """Whether the host's SSH port answers: the default probe of the rollout driver."""
    return tcp_probe(ssh_address(host))


def close_connection(host: Host, cut: bool = False) -> None:
    """Close a host's SSH connection (pyinfra's disconnect keeps paramiko's client open).

    ``cut``: only close the transport, so that a command running on it ends (its channel
    closes) and the next one fails with an SSH error pyinfra handles, instead of hanging on a
    host that vanished."""
    client = getattr(getattr(host, "connector", None), "client", None)
    if client is None:
        return
    try:
        if cut:
            transport = client.get_transport()
            if transport is not None:
                transport.close()
        else:
            client.close()
    except Exception:  # noqa: BLE001 - closing a dead connection may fail any way
        pass
    if not cut:
        host.connected = False


def probe_all(probe: Callable[[T], Any], targets: Sequence[T],
              timeout: float = ROUND_TIMEOUT) -> list[bool]:
    """``probe`` on every target at once (one greenlet each), in the targets' order; a probe
    that raises or does not end within ``timeout`` counts as no answer. One target is probed
    directly (no greenlet: works without gevent's monkey-patching)."""
    if len(targets) <= 1:
        return [_answered(probe, t) for t in targets]
    import gevent

    jobs = [gevent.spawn(probe, t) for t in targets]
    gevent.joinall(jobs, timeout=timeout)
    return [bool(j.value) if j.successful() else False for j in jobs]


def _answered(probe: Callable[[T], Any], target: T) -> bool:
    try:
        return bool(probe(target))
    except Exception:  # noqa: BLE001 - a probe that fails is a missed probe
        return False


class MissedProbes:
    """Missed probes in a row per host, and since when (``clock()`` at the first miss).

    :meth:`record` says when a host has just reached ``limit`` misses: it is lost."""

    def __init__(self, limit: int, clock: Callable[[], str]) -> None:
        self.limit, self.clock = limit, clock
        self.missed: dict[str, int] = {}
        self.since: dict[str, str] = {}

    def record(self, name: str, answered: bool) -> bool:
        if answered:
            self.missed[name] = 0
            self.since.pop(name, None)
            return False
        self.missed[name] = self.missed.get(name, 0) + 1
        self.since.setdefault(name, self.clock())
        return self.missed[name] >= self.limit
