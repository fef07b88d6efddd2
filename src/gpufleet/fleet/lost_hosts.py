"""Say why a host dropped out of a deploy: which operation, since when, what the connection said.

pyinfra reports a host whose connection died as ``Error: executed 0 commands`` (and a host that
was powered off mid-command is not reported at all: the command waits on a TCP connection
nobody answers any more). :func:`register` adds, once per pyinfra ``State``, a callback handler
that

* watches the SSH port of every host while operations run (a gevent greenlet, with the
  rollout's probes and misses: ``gpufleet.fleet.watchdog``): after ``misses`` probes in a row
  without an answer the host is lost, the line below says so at once and its SSH transport is
  closed, so that the running command fails instead of hanging the whole run;
* on an operation error, when the host's SSH port does not answer (or the watchdog lost it),
  logs one line: ``<host>: lost at operation '<op>' after 12.3 s: <the SSH error>; the host
  did not answer on port 22 since 10:42:07``. An operation that fails on a host that still
  answers is left to its own message.

A fleet run watches its batches itself (``gpufleet.fleet.batch_run``): in a ``State`` with the
run's ``Progress`` handler this one only adds the reason lines, it does not watch.
"""

from __future__ import annotations

import logging
import re
import time
import weakref
from collections.abc import Callable
from datetime import datetime
from typing import Any

from pyinfra import logger
from pyinfra.api import BaseStateCallback, State
from pyinfra.api.host import Host
from pyinfra.api.state import StateStage
from pyinfra.context import ctx_host, ctx_state

from gpufleet.fleet.progress import Progress
from gpufleet.fleet.watchdog import (
    PROBE_INTERVAL,
    PROBE_MISSES,
    MissedProbes,
    Probe,
    close_connection,
    probe_all,
    ssh_address,
    tcp_probe,
)

SETTLE_PROBES, SETTLE_S = 3, 0.5  # a failed host must answer this often to be "not lost"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CONNECTION_ERRORS = ("Command socket/SSH error: ", "Command timed out", "Command IO error: ")


def _clock() -> str:
    return datetime.now().strftime("%H:%M:%S")


def op_name(state: State, op_hash: str) -> str:
    names = sorted(state.get_op_meta(op_hash).names)
    return names[0].split(" | ")[-1] if names else "?"


class _ConnectionErrors(logging.Handler):
    """pyinfra logs a command's socket/SSH error (the exception itself reaches no callback):
    keep the last one per host, taken from the greenlet's current host."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.last: dict[str, str] = {}  # host name -> the error

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = _ANSI.sub("", record.getMessage())
        except Exception:  # noqa: BLE001 - a log record we cannot read is not ours
            return
        for marker in _CONNECTION_ERRORS:
            if marker in text and ctx_host.isset():
                error = text.split(marker, 1)[1].strip() or marker.strip()
                self.last[ctx_host.get().name] = error
                return


_ERRORS = _ConnectionErrors()


class LostHostReporter(BaseStateCallback):
    """Callback handler: the reason line for a host lost during the run (see the module)."""

    def __init__(self, probe: Probe = tcp_probe, interval: float = PROBE_INTERVAL,
                 misses: int = PROBE_MISSES, watch: bool = True,
                 settle: float = SETTLE_S) -> None:
        self.probe, self.interval, self.watch, self.settle = probe, interval, watch, settle
        self.current: dict[str, tuple[str, float]] = {}  # host -> (op name, started)
        # since: host -> wall clock of the first missed probe (or of the lost connection)
        self.probes = MissedProbes(misses, _clock)
        self.lost: set[str] = set()  # the watchdog gave up on these
        self.reported: set[str] = set()
        self._watchdog: Any = None

    # -- pyinfra callbacks (pyinfra calls them as fn(state, ...): instance methods here) ----

    def operation_start(  # type: ignore[override]
        self, state: State, op_hash: str,
    ) -> None:
        if self.watch and self._watchdog is None:
            self._watchdog = _spawn(self._watch_loop, state)

    def operation_host_start(  # type: ignore[override]
        self, state: State, host: Host, op_hash: str,
    ) -> None:
        if op_hash in state.ops[host]:
            self.current[host.name] = (op_name(state, op_hash), time.monotonic())

    def operation_host_error(  # type: ignore[override]
        self, state: State, host: Host, op_hash: str, retry_count: int = 0,
        max_retries: int = 0,
    ) -> None:
        if host.name in self.reported:
            return
        error = _ERRORS.last.pop(host.name, None)
        # Ask the host itself: a failure on a host that answers its SSH port is an ordinary one
        # (its own message says why). The error text and the transport cannot tell alone: a
        # host powered off mid-command may leave neither a logged socket error nor a closed
        # transport by the time pyinfra reports "executed 0 commands".
        if host.name not in self.lost and self._answers(host):
            return
        self.probes.since.setdefault(host.name, _clock())
        self.reported.add(host.name)
        logger.error(self.reason(host, op_name(state, op_hash), error))

    def _answers(self, host: Host) -> bool:
        """Whether the host's SSH port answers now and still a moment later: a host powering
        off can accept one more connection while its connection to us breaks."""
        address = ssh_address(host)
        for attempt in range(SETTLE_PROBES):
            if attempt:
                time.sleep(self.settle)
            if not self.probe(address):
                return False
        return True

    # -- the reason -------------------------------------------------------------------------

    def reason(self, host: Host, op: str, error: str | None = None) -> str:
        """``<host>: lost at operation '<op>' after N s: <error>; the host did not answer on
        port P since HH:MM:SS``."""
        _, started = self.current.get(host.name, (op, time.monotonic()))
        address = ssh_address(host)
        port = address[1] if address else 22
        if error is None:
            error = "SSH connection closed"
        return (f"{host.name}: lost at operation {op!r} after {time.monotonic() - started:.1f} "
                f"s: {error}; the host did not answer on port {port} since "
                f"{self.probes.since.get(host.name, _clock())}")

    # -- the watchdog -----------------------------------------------------------------------

    def check(self, state: State) -> None:
        """One round of probes over the hosts still running operations."""
        watched = [h for h in state.inventory if h in state.active_hosts
                   and h.name in self.current and h.name not in self.lost]
        answers = probe_all(self.probe, [ssh_address(h) for h in watched])
        for host, answered in zip(watched, answers, strict=True):
            if self.probes.record(host.name, answered):
                # said now: the running command (or fact) may end the host's run in a way no
                # callback sees
                self.lost.add(host.name)
                self.reported.add(host.name)
                name, _ = self.current[host.name]
                logger.error(self.reason(host, name, (
                    f"unreachable, no answer on its SSH port to {self.probes.missed[host.name]} "
                    "probes in a row: gpufleet closed its SSH connection so that the run does "
                    "not hang on it")))
                close_connection(host, cut=True)

    def _watch_loop(self, state: State) -> None:
        import gevent

        while state.current_stage < StateStage.Disconnect:
            gevent.sleep(self.interval)
            try:
                self.check(state)
            except Exception as e:  # noqa: BLE001 - the watchdog must never end the run
                logger.debug("gpufleet lost-host watchdog: %s", e)


def _spawn(fn: Callable[[State], None], state: State) -> Any:
    """A greenlet when pyinfra runs under gevent's monkey-patching (the CLI), else nothing:
    probes would block every host."""
    try:
        import gevent
        from gevent import monkey
    except ImportError:
        return None
    if not monkey.is_module_patched("socket"):
        return None
    return gevent.spawn(fn, state)


_REGISTERED: weakref.WeakKeyDictionary[State, LostHostReporter] = weakref.WeakKeyDictionary()


def register(state: State) -> LostHostReporter:
    """Add the reporter to ``state`` once (every host's deploy calls this); returns it."""
    if state not in _REGISTERED:
        # a fleet run watches its hosts itself
        in_fleet_run = any(isinstance(h, Progress) for h in state.callback_handlers)
        reporter = LostHostReporter(watch=not in_fleet_run)
        state.add_callback_handler(reporter)
        _REGISTERED[state] = reporter
        pyinfra_logger = logging.getLogger("pyinfra")
        if _ERRORS not in pyinfra_logger.handlers:
            pyinfra_logger.addHandler(_ERRORS)
    return _REGISTERED[state]


def register_current() -> LostHostReporter | None:
    """:func:`register` on the pyinfra ``State`` of the running deploy (None outside one)."""
    state = ctx_state.get()
    return register(state) if isinstance(state, State) else None
