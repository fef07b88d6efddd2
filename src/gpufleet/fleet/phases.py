"""Where a deploy's time went on each host, by recovery phase.

A pyinfra callback records when each operation started and ended on each host; the phase of an
operation is read from its name (the deploy's names in ``gpufleet.deploy.service``). The health
gate's own output (``healthy after Ns; ...``, from ``gpufleet.hostscripts.verify_endpoint``)
splits it into the server's cold start and the verification that followed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

from pyinfra.api import BaseStateCallback, State
from pyinfra.api.host import Host

# (phase, operation name prefixes), in the order a recovery goes through them
PHASE_PREFIXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("toolkit and docker", ("Check the NVIDIA driver", "daemon.json", "Docker engine",
                            "NVIDIA container toolkit", "Restart docker", "docker info")),
    ("image pull", ("Image ",)),
    ("weights", ("Weights ",)),
    ("cold start", ("Endpoint answers",)),
)
DEPLOY_PHASES = ("toolkit and docker", "image pull", "weights", "cold start", "verification",
                 "other operations")
_HEALTHY = re.compile(r"healthy after (\d+(?:\.\d+)?)s")


def phase_of(op_name: str) -> str:
    for phase, prefixes in PHASE_PREFIXES:
        if op_name.startswith(prefixes):
            return phase
    return "other operations"


def split_gate(seconds: float, output: Iterable[str]) -> dict[str, float]:
    """The health gate's time as cold start (until ``/health`` answered) and verification."""
    for line in output:
        if m := _HEALTHY.search(line):
            cold = min(float(m.group(1)), seconds)
            return {"cold start": cold, "verification": seconds - cold}
    return {"cold start": seconds}


class PhaseTimer(BaseStateCallback):
    """Seconds per phase per host (``seconds``), from the operations' start and end callbacks.

    pyinfra calls ``operation_host_success`` before it marks the operation's result complete,
    so the health gate's output is read when ``seconds`` is, after the run."""

    def __init__(self) -> None:
        self._started: dict[tuple[str, str], float] = {}
        self._timed: dict[str, dict[str, float]] = {}
        self._gates: list[tuple[State, Host, str, float]] = []
        self._ran: list[tuple[str, str, State, Host]] = []

    @property
    def seconds(self) -> dict[str, dict[str, float]]:
        out = {h: dict(p) for h, p in self._timed.items()}
        for state, host, op_hash, took in self._gates:
            op = state.ops[host].get(op_hash)
            meta = op.operation_meta if op is not None else None
            lines = meta.stdout_lines if meta is not None and meta.is_complete() else []
            mine = out.setdefault(host.name, {})
            for key, value in split_gate(took, lines).items():
                mine[key] = mine.get(key, 0.0) + value
        return out

    @property
    def changed(self) -> dict[str, list[str]]:
        """The operations that changed something, per host (what a recovery had to do)."""
        out: dict[str, list[str]] = {}
        for host_name, op_hash, state, host in self._ran:
            op = state.ops[host].get(op_hash)
            meta = op.operation_meta if op is not None else None
            if meta is not None and meta.is_complete() and meta.did_change():
                names = sorted(state.get_op_meta(op_hash).names)
                out.setdefault(host_name, []).append(names[0].split(" | ")[-1] if names
                                                     else op_hash)
        return out

    def operation_host_start(  # type: ignore[override]
        self, state: State, host: Host, op_hash: str,
    ) -> None:
        self._started[(host.name, op_hash)] = time.monotonic()

    def _end(self, state: State, host: Host, op_hash: str) -> None:
        t0 = self._started.pop((host.name, op_hash), None)
        if t0 is None:
            return
        took = time.monotonic() - t0
        self._ran.append((host.name, op_hash, state, host))
        names = sorted(state.get_op_meta(op_hash).names)
        phase = phase_of(names[0].split(" | ")[-1]) if names else "other operations"
        if phase == "cold start":
            self._gates.append((state, host, op_hash, took))
            return
        mine = self._timed.setdefault(host.name, {})
        mine[phase] = mine.get(phase, 0.0) + took

    def operation_host_success(  # type: ignore[override]
        self, state: State, host: Host, op_hash: str, retry_count: int = 0,
    ) -> None:
        self._end(state, host, op_hash)

    def operation_host_error(  # type: ignore[override]
        self, state: State, host: Host, op_hash: str, retry_count: int = 0, max_retries: int = 0,
    ) -> None:
        self._end(state, host, op_hash)


def ordered(seconds: Mapping[str, float]) -> list[tuple[str, float]]:
    return [(p, round(seconds[p], 1)) for p in DEPLOY_PHASES if p in seconds]


def as_json(seconds: Mapping[str, Any]) -> dict[str, float]:
    return dict(ordered(seconds))
