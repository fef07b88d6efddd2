"""The planner follows the vLLM release of the spec's image (gpufleet.model.vllm_releases).

Numbers as in test_plan.py (Llama 3 8B on an RTX 4000 Ada: usable 20,932,722,688 bytes, KV
131,072 bytes per token, fp8 weights 9,081,200,640, reserve 1280 MiB at 2048 batched tokens).
What v0.32.0 adds: its CUDA-graph estimate (here 16 MiB x 32 layers = 512 MiB) comes out of the
budget, so the KV cache is 512 MiB = 4,096 tokens smaller at the same utilization, and only the
576 MiB CUDA context stays outside; gpu_memory_utilization defaults to 0.92.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from gpufleet.deploy.service import vllm_args as service_vllm_args
from gpufleet.model import gpus as gpu_catalog
from gpufleet.model import vllm_args
from gpufleet.model.gpus import Gpu
from gpufleet.model.model_shape import ModelShape
from gpufleet.model.spec import SpecError, build_spec
from gpufleet.model.vllm_releases import (
    GRAPH_ESTIMATE_ENV,
    RELEASES,
    V0_11,
    V0_20,
    V0_21,
    V0_32,
    quantization_value,
    release_for,
    release_for_image,
)
from gpufleet.model.vllm_version import PINNED_VERSION, VllmVersion
from gpufleet.planner.plan import Plan, plan_for_gpus, plan_for_spec
from gpufleet.planner.render import render_table
from gpufleet.planner.shapes import KNOWN_SHAPES
from gpufleet.planner.verdict import FITS, REFUSED

L8 = KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B-Instruct"]
L70 = KNOWN_SHAPES["meta-llama/Meta-Llama-3-70B-Instruct"]
RTX4000 = gpu_catalog.gpus("rtx4000ada")
H100 = gpu_catalog.gpus("h100")
V0_11_IMAGE, V0_32_IMAGE = "vllm/vllm-openai:v0.11.0", "vllm/vllm-openai:v0.32.0"
MiB = 1 << 20
USABLE = 20_932_722_688
KV_TOKEN = 131_072
FP8_WEIGHTS = 9_081_200_640
SPEC = {"service": "llama3", "model": "meta-llama/Meta-Llama-3-8B-Instruct",
        "max_model_len": 8192, "max_num_seqs": 32, "quantization": "fp8"}


def rtx(image: str, util: float | None = 0.9, **kw: Any) -> Plan:
    return plan_for_gpus(L8, RTX4000, quantization="fp8", gpu_memory_utilization=util,
                         max_model_len=8192, image=image, **kw)


def spec_plan(gpus: Any = RTX4000, **keys: Any) -> Plan:
    return plan_for_spec(build_spec({**SPEC, "image": V0_32_IMAGE, **keys}), L8, gpus)


# -- the table ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version,row", [
    ("0.11.0", V0_11), ("0.11.2", V0_11), ("0.19.1", V0_11), ("0.20.0", V0_20), ("0.20.2", V0_20),
    ("0.21.0", V0_21), ("0.31.0", V0_21), ("0.32.0", V0_32), ("0.33.0", V0_32), ("0.9.2", V0_11),
])
def test_each_version_reads_the_row_it_falls_in(version, row):
    assert release_for(VllmVersion.parse(version)) is row


def test_the_table_is_ordered_and_each_row_says_where_it_comes_from():
    assert [r.since for r in RELEASES] == sorted(r.since for r in RELEASES)
    assert all(len(r.sources) == i + 1 for i, r in enumerate(RELEASES))
    assert all(r.batch_tiers[-1].min_total_gib == 0 for r in RELEASES)


def test_an_image_names_its_release_or_is_planned_as_the_pinned_one():
    assert release_for_image("vllm/vllm-openai:v0.32.0-cu129") == (VllmVersion(0, 32, 0), V0_32,
                                                                    None)
    for image in ("vllm/vllm-openai@sha256:" + "a" * 64, "vllm/vllm-openai:nightly"):
        version, row, note = release_for_image(image)
        assert (version, row) == (PINNED_VERSION, release_for(PINNED_VERSION))
        assert note and "planned as the pinned vLLM 0.32.0" in note
    version, row, note = release_for_image("vllm/vllm-openai:v0.10.2")
    assert row is V0_11 and note and "older than the oldest release" in note


def test_a_digest_plans_as_the_pinned_release_and_says_so():
    digest = rtx("vllm/vllm-openai@sha256:" + "b" * 64)
    pinned = rtx(V0_32_IMAGE)
    assert digest.vllm_version == "0.32.0" and digest.notes[0].startswith("image vllm/")
    assert digest.kv_cache_tokens == pinned.kv_cache_tokens and digest.flags == pinned.flags


# -- v0.32 accounting --------------------------------------------------------------------------


def test_v0_32_takes_the_cuda_graph_estimate_from_the_budget():
    old, new = rtx(V0_11_IMAGE), rtx(V0_32_IMAGE)
    budget = int(USABLE * 0.9)
    assert new.budget_bytes_per_gpu == old.budget_bytes_per_gpu == budget
    assert (old.graphs_in_budget, new.graphs_in_budget) == (False, True)
    assert new.graph_estimate_bytes_per_gpu == 512 * MiB and old.graph_estimate_bytes_per_gpu == 0
    assert new.kv_cache_bytes_per_gpu == budget - FP8_WEIGHTS - 1280 * MiB - 512 * MiB
    assert old.kv_cache_bytes_per_gpu - new.kv_cache_bytes_per_gpu == 512 * MiB
    assert (old.kv_cache_tokens, new.kv_cache_tokens) == (64_208, 64_208 - 4_096)
    assert old.outside_budget_bytes_per_gpu == (576 + 512) * MiB
    assert new.outside_budget_bytes_per_gpu == 576 * MiB
    assert any("takes its CUDA-graph estimate from the budget" in n for n in new.notes)
    assert not any("CUDA-graph estimate" in n for n in old.notes)


def test_enforce_eager_has_no_graph_estimate():
    p = rtx(V0_32_IMAGE, enforce_eager=True)
    assert p.graph_estimate_bytes_per_gpu == 0 and p.kv_cache_tokens == 64_208
    assert p.outside_budget_bytes_per_gpu == 576 * MiB


def test_the_estimate_shows_in_the_reasons_of_a_refusal():
    p = plan_for_gpus(L70, H100, quantization="fp8", max_model_len=8192, image=V0_32_IMAGE)
    assert p.verdict == REFUSED
    assert "- CUDA graph estimate 1.25 GiB = " in p.reasons[0]       # 16 MiB x 80 layers


def test_container_env_0_counts_the_graphs_outside_the_budget_as_v0_11():
    off = rtx(V0_32_IMAGE, container_env=[(GRAPH_ESTIMATE_ENV, "0")])
    assert not off.graphs_in_budget and off.kv_cache_tokens == 64_208
    assert off.outside_budget_bytes_per_gpu == (576 + 512) * MiB
    assert any(n.startswith(f"container_env {GRAPH_ESTIMATE_ENV}=0: CUDA graphs are captured "
                            "outside") for n in off.notes)
    on = rtx(V0_32_IMAGE, container_env=[(GRAPH_ESTIMATE_ENV, "1")])
    assert on.graphs_in_budget and on.kv_cache_tokens == 60_112
    # the spec's container_env reaches the plan
    from_spec = spec_plan(gpu_memory_utilization=0.9,
                          container_env={GRAPH_ESTIMATE_ENV: "0"})
    assert from_spec.kv_cache_tokens == 64_208


def test_container_env_that_vllm_cannot_read_is_refused():
    p = rtx(V0_32_IMAGE, container_env=[(GRAPH_ESTIMATE_ENV, "yes")])
    assert p.verdict == REFUSED
    assert p.reasons == (f"container_env {GRAPH_ESTIMATE_ENV}=yes: vLLM reads it as a whole "
                         "number and stops at start; set 0 or 1",)


def test_container_env_on_v0_11_has_no_effect_and_says_so():
    p = rtx(V0_11_IMAGE, container_env=[(GRAPH_ESTIMATE_ENV, "1")])
    assert not p.graphs_in_budget and p.kv_cache_tokens == 64_208
    assert any("has no effect: vLLM 0.11.0 does not read it" in n for n in p.notes)


# -- defaults ----------------------------------------------------------------------------------


def test_unset_utilization_is_the_releases_default():
    new, old = rtx(V0_32_IMAGE, util=None), rtx(V0_11_IMAGE, util=None)
    assert (old.gpu_memory_utilization, new.gpu_memory_utilization) == (0.9, 0.92)
    assert new.budget_bytes_per_gpu == int(USABLE * 0.92)
    assert new.kv_cache_tokens == 63_296                # (19,258,104,872 - ... ) // 2 MiB x 16
    assert "--gpu-memory-utilization" in new.flags
    assert new.flags[new.flags.index("--gpu-memory-utilization") + 1] == "0.92"
    assert "gpu_memory_utilization 0.92: vLLM 0.32.0's default (the spec leaves it unset)" \
        in new.notes
    assert not any(n.startswith("gpu_memory_utilization") for n in old.notes)
    # the spec's own unset value reaches the plan; a set one wins
    assert spec_plan().gpu_memory_utilization == 0.92
    assert spec_plan(gpu_memory_utilization=0.8).gpu_memory_utilization == 0.8


def test_the_spec_leaves_an_unset_utilization_to_vllm():
    spec = build_spec({**SPEC, "image": V0_32_IMAGE})
    assert spec.gpu_memory_utilization is None
    assert "--gpu-memory-utilization" not in spec.sizing_args()


def test_batch_defaults_follow_the_release_tier():
    b200 = Gpu("NVIDIA B200", 183_359, "10.0")
    old = plan_for_gpus(L8, b200, max_model_len=8192, image=V0_11_IMAGE)
    new = plan_for_gpus(L8, b200, max_model_len=8192, image=V0_32_IMAGE)
    assert (old.max_num_batched_tokens, old.max_num_seqs) == (8192, 1024)
    assert (new.max_num_batched_tokens, new.max_num_seqs) == (16384, 1024)
    assert "max_num_seqs 1024: vLLM v0.32 default for GPUs with >= 160 GiB" in new.notes
    assert new.reserve_bytes_per_gpu == 3072 * MiB      # 1280 + (16384 - 2048) / 8 MiB
    for image in (V0_11_IMAGE, V0_32_IMAGE):             # the tiers below 160 GiB did not move
        assert plan_for_gpus(L8, H100, image=image).max_num_batched_tokens == 8192
        assert plan_for_gpus(L8, RTX4000, image=image).max_num_seqs == 256


# -- fp8 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("image,value", [
    (V0_11_IMAGE, "fp8"), ("vllm/vllm-openai:v0.19.1", "fp8"),
    ("vllm/vllm-openai:v0.20.0", "fp8_per_tensor"), (V0_32_IMAGE, "fp8_per_tensor"),
])
def test_fp8_is_spelled_as_the_release_wants(image, value):
    p = rtx(image)
    assert p.flags[p.flags.index("--quantization") + 1] == value
    assert any(f"vLLM --quantization {value} on a 16-bit checkpoint" in n for n in p.notes)
    spec = build_spec({**SPEC, "image": image})
    assert spec.sizing_args()[-2:] == ["--quantization", value]


def test_a_prequantized_fp8_checkpoint_keeps_fp8():
    # vLLM refuses --quantization fp8_per_tensor when config.json says quant_method fp8
    fp8_ckpt = ModelShape.from_json({**L8.to_json(), "quantization": "fp8",
                                     "weight_bytes": 9_081_200_640})
    p = plan_for_gpus(fp8_ckpt, H100, quantization="fp8", max_model_len=8192, image=V0_32_IMAGE)
    assert p.flags[p.flags.index("--quantization") + 1] == "fp8"
    assert quantization_value("fp8", V0_32, prequantized=True) == "fp8"
    assert quantization_value("awq", V0_32) == "awq"
    assert vllm_args.quantization_flags("fp16", V0_32) == ["--dtype", "float16"]


def test_v0_32_online_fp8_loads_layer_by_layer():
    old = plan_for_gpus(L70, H100, quantization="fp8", max_model_len=8192, image=V0_11_IMAGE)
    new = plan_for_gpus(L70, H100, quantization="fp8", max_model_len=8192, image=V0_32_IMAGE)
    assert old.load_peak_bytes_per_gpu == L70.parameters * 2
    assert new.load_peak_bytes_per_gpu < old.load_peak_bytes_per_gpu / 1.8
    assert any("loads the 16-bit weights first" in r for r in old.reasons)
    assert not any("16-bit weights first" in r for r in new.reasons)
    assert rtx(V0_32_IMAGE).load_peak_bytes_per_gpu == FP8_WEIGHTS + 2 * (
        (8_030_261_248 - 1_050_939_392 + 31) // 32)     # + one layer's linear at 16 bits


# -- --kv-cache-memory-bytes -------------------------------------------------------------------


def test_every_plan_that_fits_knows_its_kv_cache_bytes():
    p = rtx(V0_32_IMAGE)
    assert p.kv_cache_memory_bytes == 60_112 * KV_TOKEN == 7_879_000_064
    assert json.loads(json.dumps(p.to_json()))["kv_cache_memory_bytes"] == 7_879_000_064
    assert "--kv-cache-memory-bytes" not in p.flags     # auto: vLLM sizes it
    assert "7,879,000,064" in render_table([p]) and "(passed)" not in render_table([p])
    refused = rtx(V0_32_IMAGE, util=0.5)
    assert refused.verdict == REFUSED and refused.kv_cache_memory_bytes == 0


def test_kv_cache_memory_planned_passes_the_planned_bytes():
    p = spec_plan(kv_cache_memory="planned")
    assert p.verdict == FITS
    assert p.flags[-2:] == ("--kv-cache-memory-bytes", str(p.kv_cache_memory_bytes))
    assert any(n.startswith(f"kv_cache_memory planned: --kv-cache-memory-bytes "
                            f"{p.kv_cache_memory_bytes} ") for n in p.notes)
    assert f"{p.kv_cache_memory_bytes:,} (passed)" in render_table([p])
    # the deploy's command line takes it from the plan
    spec = build_spec({**SPEC, "image": V0_32_IMAGE, "kv_cache_memory": "planned"})
    args = service_vllm_args(spec, "c" * 40, p)
    assert args[args.index("--kv-cache-memory-bytes") + 1] == str(p.kv_cache_memory_bytes)
    assert "--kv-cache-memory-bytes" not in spec.sizing_args()   # the spec alone knows no size
    refused = spec_plan(kv_cache_memory="planned", gpu_memory_utilization=0.5)
    assert refused.verdict == REFUSED and "--kv-cache-memory-bytes" not in refused.flags


def test_kv_cache_memory_is_a_spec_key():
    assert build_spec({**SPEC, "image": V0_32_IMAGE}).kv_cache_memory == "auto"
    with pytest.raises(SpecError, match="kv_cache_memory must be one of auto, planned, got"):
        build_spec({**SPEC, "image": V0_32_IMAGE, "kv_cache_memory": "20G"})
    with pytest.raises(SpecError, match="set the spec key 'kv_cache_memory' instead"):
        build_spec({**SPEC, "image": V0_32_IMAGE,
                    "extra_args": ["--kv-cache-memory-bytes", "20G"]})
