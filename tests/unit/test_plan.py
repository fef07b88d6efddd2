"""The planner under vLLM v0.11.0, with numbers checked by hand (the arithmetic is in the
comments). Every plan here is for a spec or an image that pins v0.11.0 (``V0_11_IMAGE``); what
v0.32 does differently is in test_plan_releases.py.

Units: MiB = 1,048,576 bytes, GiB = 1,073,741,824 bytes. Constants from gpufleet.planner.memory:
block 16 tokens; activation + non-torch reserve 1280 MiB at vLLM's 2048 batched tokens and
2048 MiB at 8192, x hidden_size/4096 when wider, + 512 MiB when tp > 1; outside the budget
576 MiB CUDA context (+256 when tp > 1) + 16 MiB x layers of CUDA graphs.

Llama 3 8B: 32 layers, hidden 4096, 32 heads, 8 KV heads, head_dim 128, vocab 128,256 (untied),
8,030,261,248 parameters, bf16 weights 16,060,522,496 bytes = 14.96 GiB, max positions 8192.
  KV bytes/token = 2 (K, V) x 32 layers x 8 heads x 128 x 2 bytes = 131,072 (128 KiB);
  a 16-token block = 2,097,152 bytes (2 MiB); one 8192-token sequence = 1 GiB.
  16-bit parameters under fp8/AWQ: embed + lm_head 2 x 128,256 x 4096 = 1,050,673,152,
  norms (2 x 32 + 1) x 4096 = 266,240; linear = 8,030,261,248 - 1,050,939,392 = 6,979,321,856.
  fp8 weights = 6,979,321,856 x 1 + 1,050,939,392 x 2 = 9,081,200,640 bytes = 8.46 GiB.

RTX 4000 Ada: 20,475 MiB, cc 8.9, driver reserve not measured -> 512 MiB assumed:
  usable 19,963 MiB = 20,932,722,688 bytes; vLLM defaults below 70 GiB: 2048 tokens, 256 seqs.
"""

from __future__ import annotations

import json
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpufleet.deploy.service import gpu_requirements
from gpufleet.deploy.service import vllm_args as service_vllm_args
from gpufleet.model import gpus as gpu_catalog
from gpufleet.model import vllm_args
from gpufleet.model.gpu_check import GpuRequirements, check_gpus
from gpufleet.model.gpus import COMPUTE_FLOORS, VLLM_FLOOR, Gpu, gpus_from_fact
from gpufleet.model.spec import build_spec
from gpufleet.model.vllm_args import QUANTIZATION_FLAGS
from gpufleet.planner import plan as planner
from gpufleet.planner.memory import kv_bytes_per_token
from gpufleet.planner.plan import Plan, plan_for_spec
from gpufleet.planner.render import render_table
from gpufleet.planner.shapes import KNOWN_SHAPES, known_shape
from gpufleet.planner.units import GiB, cc_text
from gpufleet.planner.verdict import FITS, FRAGILE, REFUSED
from gpufleet.planner.weights import estimate_weights

V0_11_IMAGE = "vllm/vllm-openai:v0.11.0"
plan_for_gpus = partial(planner.plan_for_gpus, image=V0_11_IMAGE)
L8 = KNOWN_SHAPES["meta-llama/Meta-Llama-3-8B-Instruct"]
L70 = KNOWN_SHAPES["meta-llama/Meta-Llama-3-70B-Instruct"]
L31 = KNOWN_SHAPES["meta-llama/Llama-3.1-8B-Instruct"]
RTX4000 = gpu_catalog.gpus("rtx4000ada")
H100 = gpu_catalog.gpus("h100")
H100X8 = gpu_catalog.gpus("h100x8")
MiB = 1 << 20
H100_FIXTURE = (Path(__file__).resolve().parents[1] / "facts" / "nvidia.NvidiaGpus"
                / "h100_recorded.yaml")


def rtx(quantization: str, util: float, **kw: Any) -> Plan:
    return plan_for_gpus(L8, RTX4000, quantization=quantization, gpu_memory_utilization=util,
                max_model_len=8192, **kw)


# -- building blocks ---------------------------------------------------------------------------


def test_kv_bytes_per_token():
    assert kv_bytes_per_token(L8) == 2 * 32 * 8 * 128 * 2 == 131_072
    assert kv_bytes_per_token(L8, "fp8") == 65_536          # 1 byte per value
    assert kv_bytes_per_token(L70) == 2 * 80 * 8 * 128 * 2 == 327_680
    assert kv_bytes_per_token(L70, tp=4) == 327_680 // 4 == 81_920
    # tp 16 > 8 KV heads: vLLM replicates, each GPU holds one head: 2 x 80 x 1 x 128 x 2
    assert kv_bytes_per_token(L70, tp=16) == 40_960


def test_weight_bytes_by_quantization():
    fp16 = estimate_weights(L8, "fp16")
    assert fp16.total_bytes == 8_030_261_248 * 2 == 16_060_522_496
    assert estimate_weights(L8, "auto").total_bytes == 16_060_522_496   # auto of a bf16 ckpt
    assert estimate_weights(L8, "auto").compute == "bf16"
    fp8 = estimate_weights(L8, "fp8")
    assert fp8.total_bytes == 6_979_321_856 + 2 * 1_050_939_392 == 9_081_200_640
    # online fp8 loads the bf16 checkpoint first (vLLM docs): the load peak is the bf16 size
    assert fp8.load_peak_bytes == 16_060_522_496
    awq = estimate_weights(L8, "awq")
    # 6,979,321,856 x (0.5 + 2.5/128 = 0.51953125) = 3,625,975,808; + 2,101,878,784 16-bit
    assert awq.total_bytes == 3_625_975_808 + 2_101_878_784 == 5_727_854_592
    assert awq.problems and "AWQ export" in awq.problems[0]   # a bf16 ckpt is not AWQ


def test_prequantized_checkpoint_uses_its_file_size():
    awq_ckpt = replace(L8, model="someone/Llama-3-8B-Instruct-AWQ", quantization="awq",
                       weight_bytes=5_730_000_000, parameters=1_980_000_000)
    p = plan_for_gpus(awq_ckpt, RTX4000, quantization="auto", max_model_len=8192)
    assert p.weight_bytes == 5_730_000_000 and p.verdict == FITS
    assert "--quantization" not in p.flags                  # vLLM reads it from config.json
    assert plan_for_gpus(awq_ckpt, RTX4000, quantization="awq", max_model_len=8192).fits
    wrong = plan_for_gpus(awq_ckpt, RTX4000, quantization="fp8", max_model_len=8192)
    assert wrong.verdict == REFUSED and "quantized with awq" in wrong.reasons[0]


# -- Llama 3 8B on an RTX 4000 Ada, fp16 (the blog) --------------------------------------------


def test_rtx4000_fp16_at_half_is_refused_weights_do_not_fit():
    # budget = 0.5 x 20,932,722,688 = 10,466,361,344 bytes = 9.75 GiB < weights 14.96 GiB
    p = rtx("fp16", 0.5)
    assert p.verdict == REFUSED and not p.fits
    assert p.budget_bytes_per_gpu == 10_466_361_344
    assert p.weight_bytes_per_gpu == 16_060_522_496
    assert "weights 14.96 GiB per GPU do not fit the budget 9.75 GiB" in p.reasons[0]
    # one sequence needs (16,060,522,496 + 1,342,177,280 + 1,073,741,824) / 20,932,722,688
    # = 0.8827 -> 0.89
    assert "gpu_memory_utilization >= 0.89" in p.reasons[0]


def test_rtx4000_fp16_at_0_9_fits_with_a_small_cache():
    # budget = int(0.9 x 20,932,722,688) = 18,839,450,419 (17.55 GiB)
    # KV = 18,839,450,419 - 16,060,522,496 - 1,342,177,280 (reserve) = 1,436,750,643 (1.34 GiB)
    # blocks = 1,436,750,643 // 2,097,152 = 685 -> 10,960 tokens; 10,960 / 8192 = 1.34
    # sequences of 8192 tokens at once. It starts (the blog ran it), but the cache is 7.6% of
    # the budget and holds 1.34 full-length sequences: "fragile", which still fits.
    p = rtx("fp16", 0.9)
    assert p.fits and p.verdict == FRAGILE
    assert p.budget_bytes_per_gpu == 18_839_450_419
    assert p.reserve_bytes_per_gpu == 1280 * MiB
    assert p.kv_cache_bytes_per_gpu == 1_436_750_643
    assert p.kv_cache_tokens == 10_960
    assert p.max_concurrency == pytest.approx(1.338, abs=1e-3)
    assert any("7.6% of the 17.55 GiB budget" in w for w in p.warnings)
    assert any("only 1.34 sequences of 8,192 tokens" in w for w in p.warnings)
    assert p.max_num_seqs == 256                          # vLLM v0.11 default under 70 GiB
    assert list(p.flags) == ["--tensor-parallel-size", "1", "--gpu-memory-utilization", "0.9",
                             "--max-model-len", "8192", "--max-num-seqs", "256",
                             "--dtype", "float16"]
    assert any("max_num_seqs 256 is above the 1.34 sequences" in n for n in p.notes)


def test_rtx4000_fp16_at_0_95_is_thin_outside_the_budget():
    # usable - budget = 20,932,722,688 - 19,886,086,553 = 1,046,636,135 (998 MiB) < 576 MiB
    # context + 32 x 16 MiB graphs = 1,088 MiB: the blog's "works, but dangerously thin"
    p = rtx("fp16", 0.95)
    assert p.verdict == FRAGILE
    assert any("only 998 MiB left outside the budget" in w for w in p.warnings)


def test_rtx4000_fp16_at_1_is_refused():
    # vLLM checks free memory >= 1.0 x usable after the CUDA context exists: never true
    p = rtx("fp16", 1.0)
    assert p.verdict == REFUSED
    assert "must be above 0 and below 1" in p.reasons[0]
    assert "Engine core initialization failed" in p.reasons[0]


def test_rtx4000_utilization_that_leaves_no_room_for_the_cuda_context():
    # 0.98: usable - budget = 0.02 x 19,963 MiB = 399 MiB < 576 MiB CUDA context
    # at most floor((19,963 - 1,088) / 19,963 x 100) / 100 = 0.94
    p = rtx("fp16", 0.98)
    assert p.verdict == REFUSED
    assert "less than the ~576 MiB CUDA context" in p.reasons[0]
    assert "at most 0.94" in p.reasons[0]


def test_utilization_zero_or_negative_is_refused():
    assert rtx("fp8", 0.0).verdict == REFUSED
    assert "must be above 0" in rtx("fp8", -0.2).reasons[0]


# -- the same in fp8 ---------------------------------------------------------------------------


def test_rtx4000_fp8_at_half_is_refused_kv_cache_below_one_sequence():
    # The naive view: 8 GB of fp8 weights in a 10 GB budget fits. It does not at 8192 tokens:
    # vLLM's online fp8 keeps embeddings and lm_head in bf16, so weights are 8.46 GiB, and the
    # profile run's peak activation (1.25 GiB) is inside the budget too:
    # KV = 10,466,361,344 - 9,081,200,640 - 1,342,177,280 = 42,983,424 bytes (41 MiB)
    # = 20 blocks = 320 tokens < 8192 -> vLLM would stop with "max seq len (8192) is larger than
    # the maximum number of tokens that can be stored in KV cache".
    # Enough for one sequence: (9,081,200,640 + 1,342,177,280 + 1,073,741,824) / 20,932,722,688
    # = 0.5492 -> gpu_memory_utilization >= 0.55; or max_model_len <= 320.
    p = rtx("fp8", 0.5)
    assert p.verdict == REFUSED
    assert p.weight_bytes_per_gpu == 9_081_200_640
    assert p.kv_cache_bytes_per_gpu == 42_983_424
    assert p.kv_cache_tokens == 320
    assert "KV cache too small for one sequence of max_model_len 8,192" in p.reasons[0]
    assert "gpu_memory_utilization to >= 0.55" in p.reasons[0]
    assert "max_model_len <= 320" in p.reasons[0]
    # the same budget with short requests is a (fragile) fit: 320 tokens >= 256
    short = plan_for_gpus(L8, RTX4000, quantization="fp8", gpu_memory_utilization=0.5,
                          max_model_len=256)
    assert short.verdict == FRAGILE


def test_rtx4000_fp8_at_0_9_fits_with_a_much_larger_cache():
    # KV = 18,839,450,419 - 9,081,200,640 - 1,342,177,280 = 8,416,072,499 (7.84 GiB)
    # blocks = 8,416,072,499 // 2,097,152 = 4,013 -> 64,208 tokens = 7.84 x 8192 (fp16: 1.34)
    p = rtx("fp8", 0.9)
    assert p.verdict == FITS and not p.warnings
    assert p.kv_cache_bytes_per_gpu == 8_416_072_499
    assert p.kv_cache_tokens == 64_208
    assert p.max_concurrency == pytest.approx(7.84, abs=0.01)
    assert p.kv_cache_tokens > 5 * rtx("fp16", 0.9).kv_cache_tokens
    assert p.flags[-2:] == ("--quantization", "fp8")
    # the bf16 load (14.96 GiB + 576 MiB context) fits the 19.50 GiB card
    assert p.load_peak_bytes_per_gpu == 16_060_522_496


def test_rtx4000_fp8_at_1_is_refused():
    assert rtx("fp8", 1.0).verdict == REFUSED


def test_fp8_kv_cache_halves_kv_bytes_and_doubles_tokens():
    # 65,536 bytes/token, 1 MiB blocks: 8,416,072,499 // 1,048,576 = 8,026 -> 128,416 tokens
    p = rtx("fp8", 0.9, kv_cache_dtype="fp8")
    assert p.kv_bytes_per_token_per_gpu == 65_536
    assert p.kv_cache_tokens == 128_416
    assert p.flags[-2:] == ("--kv-cache-dtype", "fp8")


# -- Llama 3 70B on H100s ----------------------------------------------------------------------
# 80 layers, hidden 8192, 64 heads, 8 KV heads, 70,553,706,496 parameters:
# bf16 141,107,412,992 bytes = 131.42 GiB. H100: 81,559 MiB, reserve 480 measured ->
# usable 81,079 MiB = 85,017,493,504; budget at 0.9 = 76,515,744,153 (71.26 GiB).
# vLLM defaults >= 70 GiB: 8192 batched tokens, 1024 seqs -> activation 2048 MiB x 8192/4096
# = 4096 MiB, + 512 MiB non-torch when tp > 1 = 4,831,838,208 bytes.


def test_llama70b_on_one_h100_is_refused():
    p = plan_for_gpus(L70, H100, quantization="bf16", max_model_len=8192)
    assert p.verdict == REFUSED and p.tensor_parallel_size == 1
    assert p.usable_bytes_per_gpu == 85_017_493_504
    assert p.budget_bytes_per_gpu == 76_515_744_153
    assert "weights 131.42 GiB per GPU do not fit the budget 71.26 GiB" in p.reasons[0]
    # fp8 does not save it: online fp8 loads 131.42 GiB of bf16 first, and 67.67 GiB of fp8
    # + 4 GiB reserve is above the budget anyway
    fp8 = plan_for_gpus(L70, H100, quantization="fp8", max_model_len=8192)
    assert fp8.verdict == REFUSED
    assert "online fp8 loads the 16-bit weights first" in fp8.reasons[0]


def test_llama70b_on_eight_h100_fits_and_the_chooser_picks_tp4():
    # tp 1: 131.42 GiB > 71.26 GiB: refused.
    # tp 2: 70,553,706,496 per GPU; KV = 76,515,744,153 - 70,553,706,496 - 4,831,838,208
    #       = 1,130,199,449; 163,840 bytes/token/GPU, blocks of 2,621,440 -> 431 blocks
    #       = 6,896 tokens < 8192: refused (one sequence needs 1.25 GiB per GPU).
    # tp 4: 35,276,853,248 per GPU; KV = 36,407,052,697; 81,920 bytes/token/GPU, blocks of
    #       1,310,720 -> 27,776 blocks = 444,416 tokens = 54.25 x 8192: fits -> chosen.
    # Smallest tp that fits: fewer all-reduces per token; the other 4 GPUs can run a replica.
    p = plan_for_gpus(L70, H100X8, quantization="bf16", max_model_len=8192)
    assert p.verdict == FITS and p.tensor_parallel_size == 4
    assert p.weight_bytes_per_gpu == 35_276_853_248
    assert p.reserve_bytes_per_gpu == 4_831_838_208
    assert p.kv_cache_bytes_per_gpu == 36_407_052_697
    assert p.kv_cache_tokens == 444_416
    assert p.max_concurrency == pytest.approx(54.25)
    assert p.max_num_seqs == 1024
    assert p.flags[:2] == ("--tensor-parallel-size", "4")
    why = p.notes[0]
    assert "tensor_parallel_size 4 chosen" in why
    assert "tp 1 refused: weights 131.42 GiB/GPU > budget 71.26 GiB" in why
    assert "tp 2 refused: KV cache 6,896 tokens < one 8,192-token sequence" in why
    assert any("uses 4 of 8 GPUs" in n for n in p.notes)


def test_llama70b_with_tp8_from_the_spec():
    # tp 8: 17,638,426,624 per GPU; KV 54,045,479,321 / 655,360 per block = 82,466 blocks
    # = 1,319,456 tokens
    p = plan_for_gpus(L70, H100X8, quantization="bf16", max_model_len=8192, tensor_parallel_size=8)
    assert p.verdict == FITS and p.kv_cache_tokens == 1_319_456
    assert p.notes[0] == "tensor_parallel_size 8: set in the spec"


def test_tensor_parallel_refusals():
    one_gpu = plan_for_gpus(L8, RTX4000, tensor_parallel_size=2)
    assert "needs 2 GPUs; the host has 1" in one_gpu.reasons[0]
    three = plan_for_gpus(L70, H100X8, max_model_len=8192, tensor_parallel_size=3)
    assert "64 attention heads are not divisible by tensor_parallel_size 3" in three.reasons
    assert any("leaves 2 of 8 GPUs idle" in n for n in three.notes)
    # 8 KV heads and tp 16 replicate (allowed); 6 KV heads and tp 4 cannot be split
    odd = replace(L8, num_attention_heads=24, num_kv_heads=6)
    assert any("one must divide the other" in r
               for r in plan_for_gpus(odd, H100X8, tensor_parallel_size=4).reasons)


def test_chooser_on_three_gpus_uses_tp1():
    # 3 GPUs: only tp 1 divides the count; a note says why
    p = plan_for_gpus(L8, [replace(H100[0], count=3)], max_model_len=8192)
    assert p.tensor_parallel_size == 1 and p.verdict == FITS
    assert "dividing 3 GPUs" in p.notes[0]


def test_host_with_fewer_gpus_than_the_spec_needs():
    assert "the spec's gpu_count needs 2" in plan_for_gpus(L8, H100, required_gpus=2).reasons[0]


# -- compute capability ------------------------------------------------------------------------

A10 = Gpu("NVIDIA A10", 23028, "8.6")
T4 = Gpu("Tesla T4", 15360, "7.5")
P100 = Gpu("Tesla P100-PCIE-16GB", 16280, "6.0")


def test_fp8_needs_compute_capability_8_9():
    p = plan_for_gpus(L8, A10, quantization="fp8", max_model_len=8192)
    assert p.verdict == REFUSED
    assert "fp8 needs compute capability 8.9" in p.reasons[0]
    assert "gpufleet requires 8.9 for fp8" in p.reasons[0]
    fp8_ckpt = replace(L8, quantization="fp8", weight_bytes=9_081_200_640)
    assert "8.9" in plan_for_gpus(fp8_ckpt, A10, max_model_len=8192).reasons[0]


def test_bf16_below_8_0_is_refused_and_fp16_suggested():
    p = plan_for_gpus(L8, T4, quantization="bf16", max_model_len=2048)
    assert any("bfloat16 needs compute capability 8.0" in r and "fp16" in r for r in p.reasons)
    auto = plan_for_gpus(L8, T4, quantization="auto", max_model_len=2048)
    assert not any("bfloat16" in r for r in auto.reasons)   # vLLM falls back to float16
    assert any("resolves auto to float16" in n for n in auto.notes)


def test_gpu_below_7_0_is_refused():
    assert "vLLM needs 7.0" in plan_for_gpus(L8, P100, quantization="fp16").reasons[0]


def _cc_below(cc: tuple[int, int]) -> str:
    major, minor = cc
    return f"{major}.{minor - 1}" if minor else f"{major - 1}.9"


@pytest.mark.parametrize("quantization", list(QUANTIZATION_FLAGS))
def test_spec_planner_and_gpu_check_read_one_compute_capability_table(quantization):
    """One table (gpufleet.model.gpus.COMPUTE_FLOORS): the spec's minimum, the deploy's GPU
    check and the planner agree on every quantization's floor and give the same reason."""
    floor = COMPUTE_FLOORS[quantization]
    spec = build_spec({**SPEC, "quantization": quantization})
    need = gpu_requirements(spec)
    assert spec.min_compute_capability == need["compute_capability"] == floor.capability
    assert need["why_compute_capability"] == floor.reason

    at_floor = Gpu("GPU at the floor", 81559, cc_text(floor.capability))
    below = Gpu("GPU below the floor", 81559, _cc_below(floor.capability))
    planned = plan_for_gpus(L8, at_floor, quantization=quantization, max_model_len=8192)
    assert not [r for r in planned.reasons if "compute capability" in r]
    refused = plan_for_gpus(L8, below, quantization=quantization, max_model_len=8192)
    assert f"{below.name} has compute capability {below.compute_capability}: {floor.reason}" \
        in refused.reasons

    fact = {"installed": True, "exit_code": 0, "gpus": [
        {"index": 0, "name": g.name, "memory_mib": g.memory_mib,
         "compute_capability": g.compute_capability} for g in (below,)]}
    problem = check_gpus(fact, GpuRequirements(1, 0, floor.capability, floor.reason), "gpu-01")
    assert problem is not None and floor.reason in problem
    assert check_gpus({**fact, "gpus": [{**fact["gpus"][0], "compute_capability":
                                         at_floor.compute_capability}]},
                      GpuRequirements(1, 0, floor.capability, floor.reason), "gpu-01") is None


def test_the_table_covers_every_quantization_with_vllms_floors():
    assert set(COMPUTE_FLOORS) == set(QUANTIZATION_FLAGS)
    # vLLM's get_min_capability: awq 75; gptq 60 (below vLLM's own 7.0); fp8 W8A8 on 8.9
    assert {q: f.capability for q, f in COMPUTE_FLOORS.items()} == {
        "auto": (7, 0), "fp16": (7, 0), "bf16": (8, 0), "fp8": (8, 9), "awq": (7, 5),
        "gptq": (7, 0)}
    assert min(f.capability for f in COMPUTE_FLOORS.values()) == VLLM_FLOOR.capability


# -- max_model_len -----------------------------------------------------------------------------


def test_max_model_len_beyond_the_model_is_refused():
    p = plan_for_gpus(L8, H100, max_model_len=16384)
    assert "max_model_len 16,384 is beyond the model's max_position_embeddings 8,192" in p.reasons


def test_max_model_len_defaults_to_the_model_and_can_be_too_long_for_the_cache():
    assert plan_for_gpus(L8, H100).max_model_len == 8192
    # Llama 3.1 8B: 131,072 positions = 16 GiB of KV per sequence; fp8 at 0.9 has 64,208 tokens
    p = plan_for_gpus(L31, RTX4000, quantization="fp8")
    assert p.max_model_len == 131_072 and p.verdict == REFUSED
    assert "set max_model_len <= 64,208" in p.reasons[0]
    assert any("max_model_len not set" in n for n in p.notes)


# -- inputs: GPUs from facts, the catalogue ----------------------------------------------------


def test_fact_dicts_plan_like_the_catalogue(fixture_fact):
    from_fact = plan_for_gpus(L8, fixture_fact["gpus"], max_model_len=8192)
    named = plan_for_gpus(L8, H100, max_model_len=8192)
    assert from_fact == named                               # reserve 480 found by name
    assert from_fact.reserved_mib == 480 and not from_fact.reserved_estimated


@pytest.fixture
def fixture_fact() -> dict[str, Any]:
    """The NvidiaGpus fact recorded on a DigitalOcean H100 droplet."""
    return yaml.safe_load(H100_FIXTURE.read_text())["fact"]


def test_gpus_from_fact(fixture_fact):
    assert gpus_from_fact(fixture_fact) == [Gpu("NVIDIA H100 80GB HBM3", 81559, "9.0", 1, 480)]
    two = {**fixture_fact, "gpus": fixture_fact["gpus"] * 2}
    assert gpus_from_fact(two)[0].count == 2
    with pytest.raises(ValueError, match="no NVIDIA driver"):
        gpus_from_fact({"installed": False, "exit_code": None, "error": None, "gpus": []})
    with pytest.raises(ValueError, match="exit code 9"):
        gpus_from_fact({"installed": True, "exit_code": 9, "error": "No devices", "gpus": []})


def test_mixed_gpus_plan_for_the_smallest():
    p = plan_for_gpus(L8, [H100[0], gpu_catalog.lookup("l40s").gpu], max_model_len=8192)
    assert p.gpu_count == 2 and p.memory_mib == 46068 and p.compute_capability == "8.9"
    assert any("mixed GPUs" in n for n in p.notes)


@pytest.mark.parametrize("name,slug", [
    ("h100", "gpu-h100x1-80gb"), ("H100x8", "gpu-h100x8-640gb"), ("h200", "gpu-h200x1-141gb"),
    ("h200x8", "gpu-h200x8-1128gb"), ("L40S", "gpu-l40sx1-48gb"),
    ("rtx4000ada", "gpu-4000adax1-20gb"), ("RTX-6000-Ada", "gpu-6000adax1-48gb"),
    ("gpu-h100x1-80gb", "gpu-h100x1-80gb"), ("GPU-4000ADAX1-20GB", "gpu-4000adax1-20gb"),
])
def test_catalogue_names(name, slug):
    assert gpu_catalog.lookup(name).slug == slug


def test_catalogue_facts_and_sources():
    h100x8 = gpu_catalog.lookup("h100x8")
    assert h100x8.gpu.count == 8 and h100x8.gpu.memory_mib == 81559 and h100x8.official
    assert gpu_catalog.lookup("h200").gpu.memory_mib == 143771
    assert gpu_catalog.lookup("l40s").gpu.compute_capability == "8.9"
    assert gpu_catalog.lookup("rtx4000ada").gpu.memory_mib == 20475
    assert gpu_catalog.lookup("rtx6000ada").gpu.memory_mib == 49140
    # only the H100 slugs are in DigitalOcean's OpenAPI spec (docs/evidence/gpu-catalogue.md)
    assert {s.slug for s in gpu_catalog.SIZES if s.official} == {"gpu-h100x1-80gb",
                                                                 "gpu-h100x8-640gb"}
    with pytest.raises(KeyError, match="unknown GPU 'a100'"):
        gpu_catalog.lookup("a100")


def test_vllm_scheduler_defaults_by_gpu_class():
    assert plan_for_gpus(L8, gpu_catalog.gpus("l40s")).max_num_seqs == 256      # 44.4 GiB usable
    assert plan_for_gpus(L8, gpu_catalog.gpus("h200")).max_num_seqs == 1024
    a100 = Gpu("NVIDIA A100-SXM4-80GB", 81920, "8.0")                   # A100: excluded
    assert plan_for_gpus(L8, a100, max_model_len=8192).max_num_seqs == 256
    assert plan_for_gpus(L8, H100, max_num_seqs=32).max_num_seqs == 32


# -- the spec, JSON and the table --------------------------------------------------------------

SPEC = {"service": "llama3", "model": "meta-llama/Meta-Llama-3-8B-Instruct",
        "image": V0_11_IMAGE, "max_model_len": 8192, "max_num_seqs": 32}


def test_plan_for_spec_reads_the_spec_and_extra_args():
    spec = build_spec({**SPEC, "quantization": "fp8", "kv_cache_dtype": "fp8",
                       "extra_args": ["--max-num-batched-tokens", "8192", "--enforce-eager"]})
    p = plan_for_spec(spec, L8, RTX4000)
    assert p.quantization == "fp8" and p.kv_cache_dtype == "fp8" and p.max_num_seqs == 32
    assert p.max_num_batched_tokens == 8192
    assert p.reserve_bytes_per_gpu == 2048 * MiB                # the 8192-token reserve
    assert p.outside_budget_bytes_per_gpu == 576 * MiB          # no CUDA graphs when eager
    fp16 = plan_for_spec(spec, L8, RTX4000, quantization="fp16", gpu_memory_utilization=0.5)
    assert fp16.verdict == REFUSED and fp16.label == "fp16"


def test_spec_and_plan_sizing_flags_come_from_one_builder(monkeypatch):
    """The spec's sizing flags and a plan's flags are built by gpufleet.model.vllm_args, and
    the same settings give the same flags in the same order."""
    calls: list[dict[str, Any]] = []
    build = vllm_args.sizing_flags

    def spy(**settings: Any) -> list[str]:
        calls.append(settings)
        return build(**settings)

    monkeypatch.setattr(vllm_args, "sizing_flags", spy)
    spec = build_spec({**SPEC, "quantization": "fp8", "kv_cache_dtype": "fp8",
                       "tensor_parallel_size": 2, "gpu_count": 2, "gpu_memory_utilization": 0.9})
    stated = spec.sizing_args()
    planned = plan_for_spec(spec, L8, gpu_catalog.gpus("h100x8"))
    assert len(calls) == 2
    assert planned.tensor_parallel_size == 2 and planned.max_num_seqs == 32
    assert list(planned.flags) == stated == build(**calls[0]) == build(**calls[1]) == [
        "--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.9",
        "--max-model-len", "8192", "--max-num-seqs", "32", "--quantization", "fp8",
        "--kv-cache-dtype", "fp8"]
    # the deploy's command line takes the plan's flags in place of the spec's
    args = service_vllm_args(spec, "c" * 40, planned)
    assert args[args.index("--tensor-parallel-size"):][:len(stated)] == stated
    assert spec.vllm_args(2) == service_vllm_args(spec) == vllm_args.serve_args(spec, gpu_count=2)


def test_to_json_is_json():
    data = json.loads(json.dumps(rtx("fp8", 0.9).to_json()))
    assert data["verdict"] == "fits" and data["fits"] is True
    assert data["kv_cache_tokens"] == 64_208
    assert data["flags"][:2] == ["--tensor-parallel-size", "1"]
    assert data["bytes_per_parameter"] == pytest.approx(9_081_200_640 / 8_030_261_248, abs=1e-4)


def test_render_table_side_by_side():
    text = render_table([rtx("fp16", 0.9), rtx("fp8", 0.9), rtx("awq", 0.9)])
    header = next(line for line in text.splitlines() if line.strip().startswith("fp16"))
    assert header.split() == ["fp16", "fp8", "awq"]
    for expected in ("14.96 GiB", "8.46 GiB", "5.33 GiB", "10,960", "64,208", "fragile",
                     "REFUSED", "--quantization fp8", "awq: refused"):
        assert expected in text
    assert render_table([]) == "(no plan)"


def test_known_shapes():
    assert known_shape("META-LLAMA/meta-llama-3-8b-instruct") is L8
    assert known_shape("mistralai/Mistral-7B-Instruct-v0.3") is None
    assert L70.parameters * 2 == L70.weight_bytes
    assert L8.weight_bytes == 16_060_522_496 and L8.weight_bytes / GiB == pytest.approx(14.96,
                                                                                         abs=0.01)
