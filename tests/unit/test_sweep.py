"""``gpufleet bench --sweep``: each value deployed and benchmarked in turn, what the planner or
the health gate refuses skipped, the host's release always put back, the best value within the
latency bound. The steps are fakes here; the lab runs the real ones (README, bench --sweep)."""

from __future__ import annotations

from typing import Any

import pytest

from gpufleet.fleet import sweep
from gpufleet.fleet.report import HEALTHY, RolloutError


class FakeHost:
    def __init__(self, refuse: set[int] = frozenset(), bench_fails: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        self.release, self.refuse, self.bench_fails = "r-orig", refuse, bench_fails
        self.log: list[str] = []
        self.value: int | None = None

    def steps(self) -> sweep.Steps:
        return sweep.Steps(deploy=self.deploy, bench=self.bench, restore=self.restore,
                           current=lambda host: self.release)

    def deploy(self, host: str, data: dict[str, Any]) -> tuple[str, str, str | None]:
        value = data["max_num_seqs"]
        self.log.append(f"deploy {value}")
        if value in self.refuse:
            return "failed", "plan: KV cache too small for 512 sequences", None
        self.value, self.release = value, f"r-{value}"
        return HEALTHY, "", self.release

    def bench(self, host: str) -> dict[str, Any]:
        self.log.append(f"bench {self.value}")
        if self.value in self.bench_fails:
            raise RolloutError("vllm bench serve failed")
        seqs = self.value or 1
        return {"output_throughput": 100.0 * min(seqs, 128), "p99_ttft_ms": 2.0 * seqs,
                "request_throughput": seqs / 10, "failed": 0}

    def restore(self, host: str, release: str) -> tuple[bool, str]:
        self.log.append(f"restore {release}")
        self.release = release
        return True, "completed"


def test_parse_sweep_takes_a_spec_key_and_values():
    assert sweep.parse_sweep("max_num_seqs=32,128,256") == ("max_num_seqs", [32, 128, 256])
    for bad in ("max_num_seqs", "nope=1,2", "max_num_seqs=32", "service=a,b"):
        with pytest.raises(RolloutError):
            sweep.parse_sweep(bad)


def test_each_value_is_deployed_then_benchmarked_and_the_release_comes_back():
    host = FakeHost()
    points, restored = sweep.sweep("h1", "max_num_seqs", [32, 128, 256], {}, host.steps(),
                                   emit=lambda _: None)
    assert host.log == ["deploy 32", "bench 32", "deploy 128", "bench 128", "deploy 256",
                        "bench 256", "restore r-orig"]
    assert restored == (True, "completed") and host.release == "r-orig"
    assert [p.outcome for p in points] == ["benchmarked"] * 3
    # 128 and 256 give the same tokens/s; the bound rules 256 out, and max() keeps the first
    assert sweep.best(points, None).value == 128  # type: ignore[union-attr]
    assert sweep.best(points, 100).value == 32  # type: ignore[union-attr]
    text = sweep.table("max_num_seqs", points, sweep.best(points, None))
    assert "max_num_seqs=128  <- best" in text and "out tok/s" in text


def test_a_refused_value_is_skipped_and_a_failed_bench_noted_and_the_host_still_restored():
    host = FakeHost(refuse={256}, bench_fails={32})
    points, restored = sweep.sweep("h1", "max_num_seqs", [32, 128, 256], {}, host.steps(),
                                   emit=lambda _: None)
    assert [p.outcome for p in points] == ["failed", "benchmarked", "refused"]
    assert "KV cache too small" in points[2].detail
    assert "bench 256" not in host.log and host.log[-1] == "restore r-orig" and restored[0]
    text = sweep.table("max_num_seqs", points, sweep.best(points, None))
    assert "max_num_seqs=256: refused: plan: KV cache too small" in text


def test_the_host_is_restored_when_the_sweep_is_interrupted():
    host = FakeHost()

    def interrupted(host_name: str) -> dict[str, Any]:
        raise KeyboardInterrupt

    steps = host.steps()
    steps.bench = interrupted
    with pytest.raises(KeyboardInterrupt):
        sweep.sweep("h1", "max_num_seqs", [32, 128], {}, steps, emit=lambda _: None)
    assert host.log[-1] == "restore r-orig"
