"""``gpufleet bench --sweep KEY=V1,V2,...``: the blog's settings table, made by a command.

For each value, in turn, on one host: a rollout of the deploy with ``KEY=value`` limited to that
host (its planner refuses, before anything changes on the host, a value its GPUs cannot run; a
value that fails its health gate is rolled back by the rollout), then ``vllm bench serve``
against it (``gpufleet.fleet.bench``). At the end, always, the host goes back to the release it
had (a rollback to it: nothing downloads). The best value is the one with the most output
tokens/s among those within the latency bound.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gpufleet.cli.data import parse_value
from gpufleet.fleet import bench
from gpufleet.fleet.report import HEALTHY, RolloutError
from gpufleet.model.spec import SPEC_KEYS


@dataclass
class Point:
    value: Any
    outcome: str  # "benchmarked", "refused" (not deployed or not healthy) or "failed" (bench)
    detail: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    release: str | None = None


def parse_sweep(text: str) -> tuple[str, list[Any]]:
    """``max_num_seqs=32,128,256`` -> ("max_num_seqs", [32, 128, 256])."""
    key, sep, values = text.partition("=")
    if not sep or not values.strip():
        raise RolloutError(f"--sweep expects KEY=V1,V2,... (such as max_num_seqs=32,128,256), "
                           f"got {text!r}")
    if key not in SPEC_KEYS:
        raise RolloutError(f"--sweep: {key!r} is not a spec key")
    if key == "service":
        raise RolloutError("--sweep: the service cannot be swept")
    parsed = [parse_value(v.strip()) for v in values.split(",") if v.strip()]
    if len(parsed) < 2:
        raise RolloutError("--sweep needs at least two values")
    return key, parsed


@dataclass
class Steps:
    """What a sweep does to the host; the defaults are the real rollout, bench and rollback."""

    deploy: Callable[[str, Mapping[str, Any]], tuple[str, str, str | None]]  # result, detail, id
    bench: Callable[[str], dict[str, Any]]
    restore: Callable[[str, str], tuple[bool, str]]  # host, release -> ok, message
    current: Callable[[str], str | None]


def sweep(host: str, key: str, values: Sequence[Any], data: Mapping[str, Any], steps: Steps,
          emit: Callable[[str], None] = print) -> tuple[list[Point], tuple[bool, str]]:
    """Deploy and benchmark each value on ``host``, then put its release back. Returns the
    points and how the restore went."""
    original = steps.current(host)
    if original is None:
        raise RolloutError(f"{host} has no current release to come back to: deploy first")
    points: list[Point] = []
    try:
        for value in values:
            emit(f"== {key}={value}: deploying on {host}")
            result, detail, release = steps.deploy(host, {**data, key: value})
            if result != HEALTHY:  # refused by its planner, or not healthy: rolled back
                points.append(Point(value, "refused", detail or result, release=release))
                emit(f"   {key}={value}: {result}: {detail} (skipped)")
                continue
            emit(f"   {key}={value}: healthy on {release}; vllm bench serve")
            try:
                summary = bench.summary(steps.bench(host))
            except RolloutError as e:
                points.append(Point(value, "failed", str(e), release=release))
                continue
            points.append(Point(value, "benchmarked", summary=summary, release=release))
    finally:
        emit(f"== restoring {host} to {original}")
        restored = steps.restore(host, original)
    return points, restored


def best(points: Sequence[Point], max_p99_ttft_ms: float | None) -> Point | None:
    """The most output tokens/s among the benchmarked points within the latency bound."""
    fit = [p for p in points if p.outcome == "benchmarked" and not p.summary.get("failed")
           and (max_p99_ttft_ms is None
                or (p.summary.get("p99_ttft_ms") or float("inf")) <= max_p99_ttft_ms)]
    return max(fit, key=lambda p: p.summary.get("output_throughput") or 0.0, default=None)


def table(key: str, points: Sequence[Point], chosen: Point | None) -> str:
    rows = [(f"{key}={p.value}" + ("  <- best" if p is chosen else ""), p.summary)
            for p in points if p.outcome == "benchmarked"]
    text = bench.table(rows) if rows else ""
    for p in points:
        if p.outcome != "benchmarked":
            text += f"{key}={p.value}: {p.outcome}: {p.detail}\n"
    return text


def lab_steps(inventory: str, deploy: str, service: str | None, work: bench.Workload,
              data: Mapping[str, Any], drain: float) -> Steps:
    """The real steps: ``gpufleet rollout --limit HOST``, ``gpufleet bench HOST`` and
    ``gpufleet rollback --to RELEASE --limit HOST``, in this process."""
    from gpufleet.fleet import rollout
    from gpufleet.fleet.releases_listing import list_releases
    from gpufleet.fleet.report import UNCHANGED

    def deploy_value(host: str, with_value: Mapping[str, Any]) -> tuple[str, str, str | None]:
        report = rollout.Driver(rollout.Options(
            command="rollout", inventory=inventory, deploy=deploy, data=dict(with_value),
            canary=1, limit=[host], drain=drain)).run()
        if report.exit_code == rollout.USAGE:
            return "refused", report.message, None
        hr = report.host(host)
        result = HEALTHY if hr.result == UNCHANGED else hr.result
        return result, hr.detail, hr.to_release or hr.now_on

    def restore(host: str, release: str) -> tuple[bool, str]:
        report = rollout.Driver(rollout.Options(
            command="rollback", inventory=inventory, data=dict(data), to_release=release,
            limit=[host], service=service, drain=drain)).run()
        return report.exit_code == rollout.OK, report.message or report.result

    def current(host: str) -> str | None:
        rows = list_releases(inventory, service=service, data=data, limit=[host])[1]
        return rows[0].get("current") if rows else None

    return Steps(deploy=deploy_value,
                 bench=lambda host: bench.run_bench(inventory, host=host, service=service,
                                                    work=work, data=data)[2],
                 restore=restore, current=current)
