"""``gpufleet status``: the host script's readings and the table (the lab runs it on real hosts
and lab/tests/test_vllm_contract.py parses the real server's /metrics with it)."""

from __future__ import annotations

import calendar
import time

import pytest

from gpufleet.fleet import status
from gpufleet.fleet.report import RolloutError
from gpufleet.hostscripts import service_status

# the real 0.32.0 exposition's shape (engine and model_name labels), two engines
METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama3-8b"} 3.0
vllm:num_requests_running{engine="1",model_name="llama3-8b"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama3-8b"} 7.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="llama3-8b"} 0.25
vllm:num_requests_waiting_by_reason{engine="0",model_name="llama3-8b",reason="x"} 9.0
vllm:num_requests_running_total 100.0
"""


def test_the_three_gauges_are_summed_over_engines_and_nothing_else_is_read():
    assert service_status.parse_metrics(METRICS) == {
        "running": 5.0, "waiting": 7.0, "kv_cache_usage": 0.25}
    assert service_status.parse_metrics("garbage\nvllm:kv_cache_usage_perc{} x\n") == {}


def row(**over):
    base = {
        "host": "llama3-gpu-01", "driver": "580.159.04", "gpu_error": None,
        "gpus": [{"name": "NVIDIA H100 80GB HBM3", "memory_used_mib": 72000.0,
                  "memory_total_mib": 81559.0}],
        "health": 200, "metrics": {"running": 5.0, "waiting": 7.0, "kv_cache_usage": 0.25},
        "release": {"id": "7398ba663135", "created": "2026-12-02T05:00:00Z",
                    "served_name": "llama3-8b", "revision": "20a10702226f10727dac"},
        "unit": {"active": "active", "sub": "running", "since_s": 3700.0, "restarts": 0},
        "uptime_s": 90000.0,
    }
    return {**base, **over}


def test_a_row_says_it_all_in_one_line():
    now = calendar.timegm(time.strptime("2026-12-02T07:00:00Z", "%Y-%m-%dT%H:%M:%SZ"))
    cells = dict(zip(status.COLUMNS, status.table_row(row(), now), strict=True))
    assert cells == {
        "host": "llama3-gpu-01", "gpus": "1x NVIDIA H100 80GB HBM3 70.3/79.6 GiB",
        "driver": "580.159.04", "release": "7398ba663135 (2h)", "unit": "active (1h)",
        "health": "ok", "model": "llama3-8b@20a10702226f", "run/wait": "5/7", "kv": "25%",
        "uptime": "1d"}


def test_a_host_down_or_unread_is_a_row_with_its_reason():
    text = status.render("llama3", [
        row(), {"host": "llama3-gpu-02", "error": "unreachable: no answer on 10.0.0.2:22"},
        row(host="llama3-gpu-03", health=503, metrics=None, release=None, gpus=[],
            gpu_error="nvidia-smi exit 9: driver not loaded",
            unit={"active": "activating", "since_s": None})])
    lines = text.splitlines()
    assert lines[0] == "service llama3: 3 hosts"
    assert "unreachable: no answer on 10.0.0.2:22" in lines[3]
    three = lines[4].split()
    assert three[:3] == ["llama3-gpu-03", "error", "580.159.04"]
    assert "none" in three and "activating" in three and "503" in three
    assert status.parse_answer("h", False, ["bash: python3: not found"]) == {
        "host": "h", "error": "cannot read its status: bash: python3: not found"}
    assert status.parse_answer("h", True, ['{"unit": {}, "health": 200}'])["health"] == 200


def test_the_command_sends_the_script_and_shows_it_masked():
    command = status.status_command("llama3")
    shown = command.get_masked_value()
    assert "<hostscripts/service_status.py>" in shown
    assert "--root=/var/lib/gpufleet --service=llama3" in shown
    assert "--service" not in status.status_command(None).get_masked_value()
    assert "def parse_metrics" in command.get_raw_value()


def test_the_fleets_service_is_the_one_the_hosts_have():
    assert status.fleet_service([{"service": "llama3"}, {"error": "x"}]) == "llama3"
    assert status.fleet_service([{"error": "x"}]) == "?"
    with pytest.raises(RolloutError, match="several services"):
        status.fleet_service([{"service": "a"}, {"service": "b"}])
