"""``gpufleet plan``: tables, JSON, GPUs from the catalogue, from facts and from nvidia-smi.

No test talks to the Hugging Face Hub: the shape comes from ``--model-shape``, ``--offline``
(the built-in shapes) or a stand-in ``gpufleet.clients.hub`` module put in ``sys.modules``.
The expected numbers are derived in tests/unit/test_plan.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import yaml

import gpufleet
from gpufleet.cli import plan as plan_cli
from gpufleet.planner.shapes import KNOWN_SHAPES

ROOT = Path(__file__).resolve().parents[2]
H100_FIXTURE = ROOT / "tests" / "facts" / "nvidia.NvidiaGpus" / "h100_recorded.yaml"
NO_DRIVER_FIXTURE = ROOT / "tests" / "facts" / "nvidia.NvidiaGpus" / "no_driver.yaml"
L8 = KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B-Instruct"]
L70 = KNOWN_SHAPES["meta-llama/Meta-Llama-3-70B-Instruct"]


@pytest.fixture(autouse=True)
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Belt and braces: nothing here may reach huggingface.co."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    path = tmp_path / "llama3.yaml"
    path.write_text(yaml.safe_dump({
        "service": "llama3", "model": "meta-llama/Meta-Llama-3-8B-Instruct",
        "image": "vllm/vllm-openai:v0.11.0", "quantization": "fp8",
        "gpu_memory_utilization": 0.9, "max_model_len": 8192, "max_num_seqs": 32}))
    return path


@pytest.fixture
def shape_file(tmp_path: Path) -> Path:
    path = tmp_path / "shape.json"
    path.write_text(json.dumps(L8.to_json()))
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = plan_cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_table_compares_quantizations_side_by_side(capsys, spec, shape_file):
    code, out, _ = run(capsys, spec, "--gpu", "rtx4000ada", "--quantization", "fp16,fp8,awq",
                       "--model-shape", shape_file)
    assert code == plan_cli.EXIT_REFUSED               # awq needs an AWQ checkpoint
    assert "== gpu-4000adax1-20gb ==" in out
    assert f"shape from file {shape_file}" in out
    header = next(line for line in out.splitlines() if line.strip().startswith("fp16"))
    assert header.split() == ["fp16", "fp8", "awq"]
    verdict = next(line for line in out.splitlines() if line.startswith("verdict"))
    assert verdict.split() == ["verdict", "fragile", "fits", "REFUSED"]
    # fp16: 10,960 tokens (1.34 x 8192); fp8: 64,208 (7.84 x); awq estimate 89,792
    tokens = next(line for line in out.splitlines() if line.startswith("tokens"))
    assert tokens.split() == ["tokens", "10,960", "64,208", "89,792"]
    assert "--max-num-seqs 32" in out and "--quantization fp8" in out


def test_json_output(capsys, spec, shape_file):
    code, out, _ = run(capsys, spec, "--gpu", "RTX4000ADA", "--quantization", "fp16,fp8",
                       "--model-shape", shape_file, "--json")
    assert code == plan_cli.EXIT_OK                    # fragile and fits both start
    data = json.loads(out)
    assert data["model"] == L8.model and data["ok"] is True
    assert data["shape"]["parameters"] == 8_030_261_248
    (host,) = data["hosts"]
    assert host["host"] == "gpu-4000adax1-20gb"
    fp16, fp8 = host["plans"]
    assert (fp16["verdict"], fp16["kv_cache_tokens"]) == ("fragile", 10_960)
    assert (fp8["verdict"], fp8["kv_cache_tokens"]) == ("fits", 64_208)
    assert fp8["flags"] == ["--tensor-parallel-size", "1", "--gpu-memory-utilization", "0.9",
                            "--max-model-len", "8192", "--max-num-seqs", "32",
                            "--quantization", "fp8"]


@pytest.mark.parametrize("util,code,verdict", [("0.5", 3, "refused"), ("1.0", 3, "refused"),
                                               ("0.9", 0, "fragile")])
def test_utilization_from_data_is_planned_not_rejected(capsys, spec, shape_file, util, code,
                                                       verdict):
    # The spec validator would stop 1.0 with a spec error; the planner refuses it with numbers.
    got, out, _ = run(capsys, spec, "--gpu", "rtx4000ada", "--quantization", "fp16",
                      "--data", f"gpu_memory_utilization={util}", "--model-shape", shape_file,
                      "--json")
    assert got == code
    assert json.loads(out)["hosts"][0]["plans"][0]["verdict"] == verdict


def test_host_fact_from_the_recorded_h100(capsys, spec, shape_file, tmp_path):
    # what `pyinfra @local fact gpufleet.facts.nvidia.NvidiaGpus` prints: {host: fact}
    fact = yaml.safe_load(H100_FIXTURE.read_text())["fact"]
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps({"h100-droplet": fact}))
    code, out, _ = run(capsys, spec, "--host-fact", facts, "--model-shape", shape_file)
    assert code == plan_cli.EXIT_OK
    assert "== h100-droplet ==" in out
    assert "1 x NVIDIA H100 80GB HBM3, 81,559 MiB (81,079 usable)" in out
    assert "compute capability 9.0" in out
    # 8B fp8 on H100: budget 0.9 x 81,079 MiB; 8192-token defaults -> 2 GiB reserve
    code, out, _ = run(capsys, spec, "--host-fact", facts, "--model-shape", shape_file,
                       "--json")
    (p,) = json.loads(out)["hosts"][0]["plans"]
    assert p["verdict"] == "fits" and p["reserved_mib"] == 480
    assert p["budget_bytes_per_gpu"] == 76_515_744_153
    assert p["max_num_batched_tokens"] == 8192


def test_host_fact_accepts_the_fact_alone_and_the_fixture_file(capsys, spec, shape_file,
                                                               tmp_path):
    fact = yaml.safe_load(H100_FIXTURE.read_text())["fact"]
    alone = tmp_path / "fact.json"
    alone.write_text(json.dumps(fact))
    for path in (alone, H100_FIXTURE):
        code, out, _ = run(capsys, spec, "--host-fact", path, "--model-shape", shape_file)
        assert code == 0 and f"== {path} ==" in out


def test_llama70b_on_the_recorded_h100_is_refused(capsys, spec, tmp_path):
    shape = tmp_path / "l70.json"
    shape.write_text(json.dumps(L70.to_json()))
    code, out, _ = run(capsys, spec, "--host-fact", H100_FIXTURE, "--model-shape", shape,
                       "--quantization", "bf16")
    assert code == plan_cli.EXIT_REFUSED
    assert "weights 131.42 GiB per GPU do not fit the budget 71.26 GiB" in out
    code, out, _ = run(capsys, spec, "--gpu", "h100x8", "--model-shape", shape,
                       "--quantization", "bf16")
    assert code == plan_cli.EXIT_OK and "tensor_parallel_size 4 chosen" in out


def test_host_without_driver_cannot_be_planned(capsys, spec, shape_file, tmp_path):
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps({
        "gpu-01": yaml.safe_load(H100_FIXTURE.read_text())["fact"],
        "gpu-02": yaml.safe_load(NO_DRIVER_FIXTURE.read_text())["fact"]}))
    code, out, _ = run(capsys, spec, "--host-fact", facts, "--model-shape", shape_file)
    assert code == plan_cli.EXIT_REFUSED
    assert "== gpu-02 ==\ncannot plan: no NVIDIA driver" in out
    code, out, _ = run(capsys, spec, "--host-fact", facts, "--model-shape", shape_file, "--json")
    hosts = json.loads(out)["hosts"]
    assert hosts[1] == {"host": "gpu-02", "error": "no NVIDIA driver: nvidia-smi is not installed"}


def test_local_runs_the_fact_command(capsys, spec, shape_file, monkeypatch):
    recorded = yaml.safe_load(H100_FIXTURE.read_text())
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "\n".join(recorded["output"]) + "\n", "")

    monkeypatch.setattr(plan_cli.subprocess, "run", fake_run)
    code, out, _ = run(capsys, spec, "--local", "--model-shape", shape_file)
    assert code == 0 and "== localhost ==" in out and "NVIDIA H100 80GB HBM3" in out
    assert "nvidia-smi --query-gpu=index,uuid,name,memory.total" in calls[0][2]


def test_gpus_json(capsys, spec, shape_file, tmp_path):
    gpus = tmp_path / "gpus.json"
    gpus.write_text(json.dumps([{"name": "NVIDIA L40S", "memory_mib": 46068,
                                 "compute_capability": "8.9", "count": 2}]))
    code, out, _ = run(capsys, spec, "--gpus-json", gpus, "--model-shape", shape_file, "--json")
    (p,) = json.loads(out)["hosts"][0]["plans"]
    assert code == 0 and p["gpu_count"] == 2 and p["reserved_mib"] == 582


def test_offline_uses_the_built_in_shapes(capsys, spec):
    code, out, _ = run(capsys, spec, "--gpu", "h100", "--offline")
    assert code == 0 and "built-in shape, not pinned to a revision (offline)" in out


def test_unknown_model_offline_needs_a_shape_file(capsys, tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"service": "m", "model": "acme/secret-model",
                                    "image": "vllm/vllm-openai:v0.11.0"}))
    code, _, err = run(capsys, path, "--gpu", "h100")
    assert code == plan_cli.EXIT_INPUT
    assert "pass --model-shape FILE" in err and "acme/secret-model" in err


def fake_hub(monkeypatch: pytest.MonkeyPatch, result: Any) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []

    def model_shape(model: str, revision: str, token: str | None,
                    endpoint: str | None = None, cache_dir: Path | None = None) -> Any:
        calls.append({"model": model, "revision": revision, "token": token,
                      "endpoint": endpoint})
        if isinstance(result, Exception):
            raise result
        return result

    module = types.ModuleType("gpufleet.clients.hub")
    module.model_shape = model_shape  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gpufleet.clients.hub", module)
    monkeypatch.setattr(gpufleet, "hub", module, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    return calls


def test_shape_from_the_hub_module(capsys, spec, monkeypatch):
    pinned = L8.__class__(**{**L8.to_json(), "commit": "a" * 40, "files": ()})
    calls = fake_hub(monkeypatch, pinned)
    code, out, _ = run(capsys, spec, "--gpu", "h100", "--json")
    assert code == 0 and json.loads(out)["commit"] == "a" * 40
    assert calls == [{"model": L8.model, "revision": "main", "token": "hf_test",
                      "endpoint": "http://127.0.0.1:9"}]


def test_hub_failure_falls_back_to_a_built_in_shape(capsys, spec, monkeypatch):
    fake_hub(monkeypatch, RuntimeError("401 gated"))
    code, out, _ = run(capsys, spec, "--gpu", "h100")
    assert code == 0 and "the Hub failed: RuntimeError: 401 gated" in out


def test_bad_input_exits_2(capsys, spec, shape_file):
    code, _, err = run(capsys, spec, "--gpu", "h100", "--quantization", "int4",
                       "--model-shape", shape_file)
    assert code == plan_cli.EXIT_INPUT and "'int4'" in err
    code, _, err = run(capsys, spec, "--gpu", "a100", "--model-shape", shape_file)
    assert code == plan_cli.EXIT_INPUT and "unknown GPU 'a100'" in err
    code, _, err = run(capsys, spec, "--gpu", "h100", "--data", "port=22",
                       "--model-shape", shape_file)
    assert code == plan_cli.EXIT_INPUT and "port" in err
    with pytest.raises(SystemExit):                    # one GPU source is required
        plan_cli.main([str(spec)])


def test_add_parser_registers_plan_on_a_parent_parser(spec, shape_file):
    parser = argparse.ArgumentParser(prog="gpufleet")
    plan_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", str(spec), "--gpu", "l40s", "--model-shape",
                              str(shape_file), "--json"])
    assert args.func is plan_cli.cmd_plan and args.gpu == "l40s"
