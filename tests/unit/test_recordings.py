"""The fact fixtures are cut from the real H100 recordings, not invented."""

from pathlib import Path

import yaml

from gpufleet.facts.nvidia import GPU_QUERY_FIELDS, parse_gpu_rows

ROOT = Path(__file__).resolve().parents[2]
REC = ROOT / "lab" / "src" / "gpufleet_lab" / "recordings" / "h100-80gb-hbm3"


def recorded_row() -> str:
    header = [h.split(" [")[0] for h in (REC / "query-gpu.csv").read_text().splitlines()[0]
              .split(", ")]
    row = (REC / "query-gpu-nounits.csv").read_text().splitlines()[0].split(", ")
    return ", ".join(row[header.index(f)] for f in GPU_QUERY_FIELDS)


def test_h100_fixture_matches_the_recording():
    fixture = yaml.safe_load((ROOT / "tests/facts/nvidia.NvidiaGpus/h100_recorded.yaml")
                             .read_text())
    assert fixture["output"][1] == recorded_row()


def test_recorded_row_parses():
    (gpu,) = parse_gpu_rows([recorded_row()])
    assert gpu["name"] == "NVIDIA H100 80GB HBM3"
    assert gpu["memory_mib"] == 81559 and gpu["compute_capability"] == "9.0"
    assert gpu["driver_version"] == "580.159.04"


def test_driver_not_loaded_message_is_the_real_one():
    text = (REC / "edge-cases.txt").read_text()
    assert "rc=" in text  # the edge cases carry real exit codes
    fixture = yaml.safe_load((ROOT / "tests/facts/nvidia.NvidiaGpus/driver_not_loaded.yaml")
                             .read_text())
    assert fixture["fact"]["exit_code"] == 9
    assert "couldn't communicate with the NVIDIA driver" in fixture["fact"]["error"]
