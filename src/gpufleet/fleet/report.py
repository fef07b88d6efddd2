"""What a rollout or rollback tells: exit statuses, each host's result, the report, live lines.

The report is built as the run goes (``gpufleet.fleet.rollout``), printed by the CLI as a table
or JSON, and each host's part of it becomes that host's line in the service's audit log.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from pyinfra.api.exceptions import PyinfraError

from gpufleet.model import release as releases

# exit statuses
OK, FAILED_WITHIN_LIMIT, USAGE, ABORTED, UNREACHABLE, LOCKED = 0, 1, 2, 3, 4, 5

# host results
HEALTHY = "healthy"
UNCHANGED = "unchanged"
ROLLED_BACK = "failed, rolled back"
ROLLBACK_FAILED = "failed, rollback failed"
NOT_ROLLED_BACK = "failed, nothing to roll back to"
FAILED = "failed"
NOT_REACHED = "not reached"
SKIPPED = "skipped"


class RolloutError(PyinfraError):
    """The rollout cannot start: bad options, inventory or deploy. Nothing changed."""


@dataclass
class HostResult:
    host: str
    batch: str | None = None
    from_release: str | None = None
    to_release: str | None = None
    result: str = NOT_REACHED
    detail: str = ""
    seconds: float | None = None
    now_on: str | None = None  # the release current on the host when the rollout ended


@dataclass
class Report:
    id: str
    command: str
    by: str
    started: str
    inventory: str
    deploy: str | None = None
    service: str | None = None
    finished: str | None = None
    result: str = "error"
    exit_code: int = USAGE
    message: str = ""
    batches: list[dict[str, Any]] = field(default_factory=list)
    hosts: list[HostResult] = field(default_factory=list)
    lock: dict[str, Any] | None = None
    audit_missing: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def host(self, name: str) -> HostResult:
        return next(h for h in self.hosts if h.host == name)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def add_time(self, key: str, seconds: float) -> None:
        """Add ``seconds`` to the timing ``key`` (rounded to the millisecond)."""
        self.timings[key] = round(self.timings.get(key, 0.0) + seconds, 3)

    def stopped(self, batch: str, failed: list[str], max_failed: int, rest: list[str]) -> None:
        """The run stopped after ``batch``: more than ``max_failed`` hosts failed in it;
        the hosts ``rest`` of the later batches were not touched."""
        self.result, self.exit_code = "aborted", ABORTED
        self.message = (f"{batch}: {len(failed)} host(s) failed ({', '.join(failed)}), "
                        f"more than --max-failed {max_failed}; stopped"
                        + (f", {len(rest)} host(s) not reached: {', '.join(rest)}"
                           if rest else ""))
        for name in rest:
            self.host(name).detail = "untouched (rollout stopped)"

    def completed(self) -> None:
        """The run went through all its batches: completed, with failures or without."""
        skipped = [h.host for h in self.hosts if h.result == SKIPPED]
        if skipped:
            self.message = f"{len(skipped)} host(s) skipped: {', '.join(skipped)}"
        if any(h.result.startswith("failed") for h in self.hosts):
            self.result, self.exit_code = "completed with failures", FAILED_WITHIN_LIMIT
        else:
            self.result, self.exit_code = "completed", OK

    def audit_line(self, name: str) -> str:
        """The JSON line the audit log of host ``name`` gets for this run."""
        hr = self.host(name)
        entry = releases.AuditEntry(
            rollout=self.id, command=self.command, by=self.by, started=self.started,
            finished=self.finished or releases.now_iso(), result=self.result, host=name,
            batch=hr.batch, from_release=hr.from_release, to_release=hr.to_release,
            host_result=hr.result, seconds=hr.seconds, options=self.options)
        return entry.to_json()


class Events(Protocol):
    """Receives the live progress; the CLI prints it. ``host`` is None for rollout-wide lines."""

    def emit(self, host: str | None, text: str) -> None: ...


class Silent:
    def emit(self, host: str | None, text: str) -> None:
        pass
