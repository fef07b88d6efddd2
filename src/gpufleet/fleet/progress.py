"""pyinfra's callbacks during a fleet run -> live host lines, why a host failed, the time spent
in health gates.

The health gate of each host is the operation its deploy handed back
(``gpufleet.fleet.deploy_results``): the one that proves the endpoint answers.
"""

from __future__ import annotations

import time
from typing import Any

from pyinfra.api import BaseStateCallback, State
from pyinfra.api.host import Host

from gpufleet.fleet.deploy_results import any_health_gate, is_health_gate
from gpufleet.fleet.report import Events


class Progress(BaseStateCallback):
    """Live lines (``connecting``, ``<verb>``, ``waiting for health``), connection errors, when
    each host was last heard of, and the seconds spent in health gates.

    A fleet run watches its hosts itself: ``gpufleet.fleet.lost_hosts`` sees this handler on a
    ``State`` and leaves the watching to the run."""

    def __init__(self, events: Events, verb: str) -> None:
        self.events, self.verb = events, verb
        self.connect_errors: dict[str, str] = {}
        self.last_seen: dict[str, float] = {}
        self.health_started: float | None = None
        self.health_wait = 0.0

    def host_before_connect(  # type: ignore[override]
        self, state: State, host: Host,
    ) -> None:
        self.events.emit(host.name, "connecting")

    def host_connect(  # type: ignore[override]
        self, state: State, host: Host,
    ) -> None:
        self.events.emit(host.name, self.verb)

    def host_connect_error(  # type: ignore[override]
        self, state: State, host: Host, error: Any,
    ) -> None:
        self.connect_errors[host.name] = str(error)

    def operation_start(  # type: ignore[override]
        self, state: State, op_hash: str,
    ) -> None:
        if any_health_gate(state, op_hash):
            self.health_started = time.monotonic()

    def operation_end(  # type: ignore[override]
        self, state: State, op_hash: str,
    ) -> None:
        if self.health_started is not None and any_health_gate(state, op_hash):
            self.health_wait += time.monotonic() - self.health_started
            self.health_started = None

    def operation_host_start(  # type: ignore[override]
        self, state: State, host: Host, op_hash: str,
    ) -> None:
        if is_health_gate(state, host, op_hash):
            self.events.emit(host.name, "waiting for health")

    def operation_host_success(  # type: ignore[override]
        self, state: State, host: Host, op_hash: str, retry_count: int = 0,
    ) -> None:
        self.last_seen[host.name] = time.monotonic()

    def operation_host_error(  # type: ignore[override]
        self, state: State, host: Host, op_hash: str, retry_count: int = 0, max_retries: int = 0,
    ) -> None:
        self.last_seen[host.name] = time.monotonic()


def failure_reason(state: State, host: Host) -> str:
    """The first failed operation of a host, the first line it printed and its last one (the
    verification prints the container's last log lines after its verdict)."""
    for op_hash in state.get_op_order():
        op_data = state.ops[host].get(op_hash)
        if op_data is None or not op_data.operation_meta.is_complete():
            continue
        meta = op_data.operation_meta
        if not meta.did_error():
            continue
        name = sorted(state.get_op_meta(op_hash).names)[0].split(" | ")[-1]
        lines = [ln.strip() for ln in (meta.stderr_lines or meta.stdout_lines) if ln.strip()]
        if not lines:
            return f"{name} failed"
        first = lines[0].removeprefix("gpufleet: ").removeprefix(f"{host.name}: ")
        first = first.split(". Last log lines of ")[0]
        last = f" (last log line: {lines[-1][:160]})" if len(lines) > 1 else ""
        return f"{name}: {first}{last}"
    return "failed"
