"""A deploy's time by recovery phase: operation names to phases, the health gate split."""

from __future__ import annotations

from gpufleet.fleet import phases


def test_the_deploy_s_operations_fall_in_their_phases():
    assert phases.phase_of("Docker engine installed and running") == "toolkit and docker"
    assert phases.phase_of("NVIDIA container toolkit 1.17.8-1") == "toolkit and docker"
    assert phases.phase_of("daemon.json: nvidia runtime as default") == "toolkit and docker"
    assert phases.phase_of("Image vllm/vllm-openai:v0.32.0") == "image pull"
    assert phases.phase_of("Weights meta-llama/Meta-Llama-3-8B-Instruct@20a10702 staged in "
                           "/opt/models") == "weights"
    assert phases.phase_of("Endpoint answers on :8000 as 'llama3-8b'") == "cold start"
    assert phases.phase_of("systemd unit gpufleet-llama3.service") == "other operations"


def test_the_gate_splits_into_cold_start_and_verification():
    out = ["healthy after 41s; served 'llama3-8b', completion: 'OK'"]
    assert phases.split_gate(44.0, out) == {"cold start": 41.0, "verification": 3.0}
    assert phases.split_gate(10.0, ["something else"]) == {"cold start": 10.0}
    assert phases.split_gate(5.0, ["healthy after 9s; ok"]) == {"cold start": 5.0,
                                                               "verification": 0.0}


def test_phases_come_out_in_recovery_order():
    got = phases.ordered({"weights": 2.04, "image pull": 30.0, "other operations": 1.0,
                          "toolkit and docker": 12.0})
    assert got == [("toolkit and docker", 12.0), ("image pull", 30.0), ("weights", 2.0),
                   ("other operations", 1.0)]
