"""Which hosts a rebuild or a drill takes down, in which batches, and what it refuses (no hosts:
the fleet's health is given)."""

from __future__ import annotations

import pytest

from gpufleet.fleet.recovery import HostRecovery, RebuildOptions, Recovery
from gpufleet.fleet.report import RolloutError


def planned(targets: list[str], healthy: set[str], fleet: int = 4, **opts) -> list[list[str]]:
    r = Recovery(RebuildOptions(inventory="inventories/do.py", deploy="deploys/llama3.py",
                                hosts=targets, **opts), client=object())  # type: ignore[arg-type]
    r.report.hosts = [HostRecovery(host=n, droplet_id=i, addresses=[])
                      for i, n in enumerate(targets)]
    r.healthy = healthy
    r._plan(fleet=fleet)
    assert all(h.batch for h in r.report.hosts)
    return r.report.batches


def test_hosts_out_of_service_go_first_together_then_one_healthy_host_at_a_time():
    assert planned(["a", "b", "c"], {"b", "c", "d"}) == [["a"], ["b"], ["c"]]
    assert planned(["b", "c", "a"], {"b", "c", "d"}, batch="2") == [["a"], ["b", "c"]]
    assert planned(["a", "b"], {"c"}) == [["a", "b"]]  # both down already: one batch


def test_a_percentage_batch_is_of_the_whole_fleet():
    assert planned(["a", "b", "c", "d"], {"a", "b", "c", "d", "e", "f", "g", "h"}, fleet=8,
                   batch="25%") == [["a", "b"], ["c", "d"]]


def test_the_last_healthy_host_is_refused_unless_forced():
    with pytest.raises(RolloutError, match="last healthy host.*--force"):
        planned(["a", "b"], {"a", "b"})
    assert planned(["a", "b"], {"a", "b"}, force=True) == [["a"], ["b"]]
    assert planned(["a"], set()) == [["a"]]  # nothing serves: nothing to protect


def test_a_drill_needs_a_healthy_host_and_another_that_keeps_serving():
    assert planned(["a"], {"a", "b"}, command="drill") == [["a"]]
    with pytest.raises(RolloutError, match="never rebuilds the last healthy host"):
        planned(["a"], {"a"}, command="drill")
    with pytest.raises(RolloutError, match="a is not healthy"):
        planned(["a"], {"b"}, command="drill")


def snapshot_plan(healthy: set[str], force: bool = False, service: str | None = "llama3"):
    from gpufleet.fleet.golden import GoldenSnapshot

    g = GoldenSnapshot(RebuildOptions(inventory="inventories/do.py", deploy="deploys/llama3.py",
                                      hosts=["a"], command="snapshot", force=force),
                       client=object(), name="gold")  # type: ignore[arg-type]
    g.report.hosts = [HostRecovery(host="a", droplet_id=1, addresses=[])]
    g.report.service, g.healthy = service, healthy
    g._plan(fleet=3)
    return g.report.batches


def test_a_golden_snapshot_takes_its_host_out_of_service_so_not_the_last_healthy_one():
    assert snapshot_plan({"a", "b"}) == [["a"]]
    assert snapshot_plan({"b"}) == [["a"]]
    with pytest.raises(RolloutError, match="last healthy host.*--force"):
        snapshot_plan({"a"})
    assert snapshot_plan({"a"}, force=True) == [["a"]]
    with pytest.raises(RolloutError, match="serves no gpufleet service"):
        snapshot_plan(set(), service=None)


def test_the_scrub_holds_the_run_lock_and_removes_every_secret():
    import shlex

    from gpufleet.fleet.golden import LOCK_HELD_EXIT, scrub_command

    words = shlex.split(scrub_command("llama3"))
    at = words.index("flock")
    assert words[at:at + 5] == ["flock", "-n", "-E", str(LOCK_HELD_EXIT),
                                "/var/lib/gpufleet/llama3/lock"]
    inner = words[-1]
    assert inner.startswith("systemctl disable --now gpufleet-llama3.service && { systemctl "
                            "disable --now nginx.service 2>/dev/null || true; } && rm -f ")
    assert ("/etc/gpufleet/llama3.env /etc/gpufleet/llama3.hf-token "
            "/etc/gpufleet/llama3.front-keys.conf /etc/gpufleet/llama3.tls.key "
            "/etc/gpufleet/weights-peer-*") in inner
    assert inner.endswith("&& sync")
