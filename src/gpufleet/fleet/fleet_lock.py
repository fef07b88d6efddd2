"""The service's run lock over a whole fleet run: taken on every host or on none, audit lines
written under it, released however the run ends.

Each host's lock is a lease (``gpufleet.fleet.run_lock``) held by the connections of the
``State`` it was taken in; that ``State`` stays open until :meth:`FleetLock.release`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pyinfra.api import State
from pyinfra.api.host import Host

from gpufleet.fleet import run_lock
from gpufleet.fleet import session as fleet_session
from gpufleet.fleet.report import LOCKED, UNREACHABLE
from gpufleet.model import release as releases
from gpufleet.operations.release_records import audit_command

Acquire = Callable[..., run_lock.Lease | None]  # run_lock.acquire's signature


@dataclass(frozen=True)
class LockRefusal:
    """Why the run cannot go ahead: the report's result, exit status and message."""

    result: str
    exit_code: int
    message: str
    holder: dict[str, Any] | None = None  # another run's holder, when one holds the lock


class FleetLock:
    """The leases of one run, host name -> lease."""

    def __init__(self, acquire: Acquire = run_lock.acquire) -> None:
        self.acquire = acquire
        self.leases: dict[str, run_lock.Lease] = {}
        self._state: State | None = None  # its connections hold the leases

    def take(self, state: State, hosts: list[Host], service: str, holder: releases.LockHolder,
             wait: float = 0.0, break_lock: bool = False,
             emit: Callable[[str, str], None] | None = None) -> LockRefusal | None:
        """Take ``service``'s run lock on every host (``break_lock``: end a hung holder first,
        ``emit`` says whose). A lock held elsewhere, or one that cannot be taken, refuses the
        whole run: the leases taken are released and the refusal returned."""
        if break_lock:
            command = run_lock.break_command(service)
            for name, (_ok, lines) in fleet_session.shell(state, hosts, lambda h: command).items():
                broken = run_lock.holder_json(lines)
                if broken and emit is not None:
                    emit(name, f"broke the lock of {run_lock.describe(broken)}")
        results = fleet_session.in_parallel(
            lambda h: self.acquire(state, h, service, holder, wait), hosts, timeout=wait + 60)
        self.leases = {n: v for n, v in results.items() if isinstance(v, run_lock.Lease)}
        held = {n: v.holder for n, v in results.items()
                if isinstance(v, run_lock.LockError) and v.holder is not None}
        failed = {n: str(v) for n, v in results.items()
                  if isinstance(v, Exception) and n not in held}
        refusal = _refusal(service, held, failed)
        if refusal is not None:
            self.release()
        elif self.leases:
            self._state = state
        return refusal

    def holds(self, state: State) -> bool:
        """Whether the connections of ``state`` hold leases (keep them open until
        :meth:`release`)."""
        return self._state is state

    def audit(self, lines: Mapping[str, str], answers: Callable[[str], bool]) -> list[str]:
        """Write each host's audit line through its lease; returns the hosts that did not get
        theirs (their lease is dropped at once: its host is gone, do not wait for it)."""
        missed = [name for name, line in lines.items() if name in self.leases
                  # a host that does not answer its SSH port cannot answer on its lease either
                  and (not answers(name) or not self.leases[name].audit(line))]
        for name in missed:
            self.leases.pop(name).release(timeout=1)
        return missed

    def audit_and_release(self, session: fleet_session.FleetSession, service: str,
                          lines: Mapping[str, str], answers: Callable[[str], bool]) -> list[str]:
        """Each host's audit line under its lease, then every lease released; a host whose
        lease was lost on the way gets its line through a new connection if it answers again.
        Returns the hosts that did not get their line."""
        missed = self.audit(lines, answers)
        self.release()
        reachable = [n for n in missed if answers(n)]
        if not reachable:
            return missed
        still = audit_without_lease(session, reachable, service, lines)
        return [n for n in missed if n not in reachable or n in still]

    def release(self) -> None:
        """Release every lease and close the connections that held them."""
        for lease in self.leases.values():
            lease.release()
        self.leases = {}
        if self._state is not None:
            fleet_session.shutdown(self._state)
            self._state = None


def _refusal(service: str, held: Mapping[str, dict[str, Any] | None],
             failed: Mapping[str, str]) -> LockRefusal | None:
    if held:
        first = next(iter(held.values()))
        return LockRefusal(
            "refused: locked", LOCKED,
            f"the {service} run lock is held on {', '.join(sorted(held))} by "
            f"{run_lock.describe(first)}; nothing changed. Wait for that run (--wait S), or "
            "end it if it hangs with --break-lock", holder=first)
    if failed:
        return LockRefusal("refused: lock failed", UNREACHABLE, "could not take the lock on "
                           + "; ".join(f"{n}: {why}" for n, why in sorted(failed.items())))
    return None


def audit_without_lease(session: fleet_session.FleetSession, names: list[str], service: str,
                        lines: Mapping[str, str]) -> list[str]:
    """Write the audit lines of hosts whose lease was lost through new connections; returns
    the hosts that still did not get theirs."""
    if not names:
        return []
    state = session.state(names)
    try:
        hosts = fleet_session.connect(state)
        results = fleet_session.shell(state, hosts,
                                      lambda h: audit_command(service, lines[h.name]))
        return [n for n in names if not results.get(n, (False, []))[0]]
    finally:
        fleet_session.shutdown(state)
