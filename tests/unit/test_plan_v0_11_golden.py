"""An image that pins vLLM v0.11.0 plans exactly as the planner did before it followed the image's
version: every number, verdict, flag and message of these plans is recorded in
``data/plans_v0_11_0.json`` (a digest of the whole plan, and its main numbers to read a failure).

Regenerate only when a v0.11 plan is meant to change:
``.venv/bin/python tests/unit/test_plan_v0_11_golden.py``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from gpufleet.model import gpus as gpu_catalog
from gpufleet.model.spec import build_spec
from gpufleet.planner.plan import plan_for_spec
from gpufleet.planner.shapes import KNOWN_SHAPES

GOLDEN = Path(__file__).with_name("data") / "plans_v0_11_0.json"
IMAGE = "vllm/vllm-openai:v0.11.0"
# the Plan keys of the v0.11 planner: keys added since are not part of the record
KEYS = ("label", "model", "commit", "gpu_name", "gpu_count", "memory_mib", "reserved_mib",
        "reserved_estimated", "compute_capability", "quantization", "weight_format",
        "kv_cache_dtype", "tensor_parallel_size", "gpu_memory_utilization", "max_model_len",
        "max_num_seqs", "max_num_batched_tokens", "parameters", "weight_bytes",
        "weight_bytes_per_gpu", "load_peak_bytes_per_gpu", "usable_bytes_per_gpu",
        "budget_bytes_per_gpu", "reserve_bytes_per_gpu", "outside_budget_bytes_per_gpu",
        "kv_bytes_per_token", "kv_bytes_per_token_per_gpu", "kv_cache_bytes_per_gpu",
        "kv_cache_tokens", "max_concurrency", "verdict", "reasons", "warnings", "notes",
        "flags", "fits", "bytes_per_parameter", "headroom_fraction")
SHOWN = ("budget_bytes_per_gpu", "kv_cache_bytes_per_gpu", "kv_cache_tokens", "verdict")


def cases() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for model in ("meta-llama/Meta-Llama-3-8B-Instruct", "meta-llama/Meta-Llama-3-70B-Instruct"):
        for gpu in ("rtx4000ada", "h100", "h100x8"):
            for quantization in ("fp16", "fp8", "awq"):
                for util in (None, 0.5):
                    for extra in ({}, {"max_model_len": 8192, "max_num_seqs": 32},
                                  {"max_model_len": 4096, "extra_args": ["--enforce-eager"],
                                   "kv_cache_dtype": "fp8"}):
                        out.append({"model": model, "gpu": gpu, "quantization": quantization,
                                    **({"gpu_memory_utilization": util} if util else {}),
                                    **extra})
    return out


def record(case: dict[str, Any]) -> dict[str, Any]:
    spec = build_spec({"service": "llama3", "image": IMAGE,
                       **{k: v for k, v in case.items() if k != "gpu"}})
    plan = plan_for_spec(spec, KNOWN_SHAPES[case["model"]], gpu_catalog.gpus(case["gpu"]))
    data = plan.to_json()
    whole = json.dumps({k: data[k] for k in KEYS}, sort_keys=True)
    return {**{k: data[k] for k in SHOWN},
            "sha256": hashlib.sha256(whole.encode()).hexdigest()}


def _name(case: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in case.items())


@pytest.mark.parametrize("case", cases(), ids=_name)
def test_a_v0_11_plan_is_unchanged(case: dict[str, Any]) -> None:
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    assert record(case) == golden[_name(case)]


if __name__ == "__main__":
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({_name(c): record(c) for c in cases()}, indent=1) + "\n",
                      encoding="utf-8")
    sys.exit(0)
