"""Where one GPU's memory goes under vLLM: the memory model and its constants.

The model is vLLM's ``vllm/v1/worker/gpu_worker.py`` (v0.11.0 and v0.32.0); what differs by
release is in ``gpufleet.model.vllm_releases``; ``docs/planner.md`` derives it, and
``docs/evidence/`` holds the measurements and log figures behind the constants. Per GPU:

    usable   = memory.total - memory.reserved      (what CUDA reports as total)
    budget   = usable x gpu_memory_utilization     (vLLM's ``requested_memory``)
    KV cache = budget - weights/tp - reserve [- CUDA graphs]
               (reserve: peak activation + non-torch; vLLM >= 0.21 also takes its CUDA-graph
               estimate from the budget, unless VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS=0)
    outside the budget: the CUDA context (made before vLLM's start-up snapshot) and, where the
    estimate is not in the budget (v0.11), the CUDA graphs, captured after the KV cache.
    KV bytes per token = 2 (K and V) x layers x kv_heads x head_dim x dtype bytes, / tp

Every constant says where it comes from. They are estimates: vLLM measures the real values at
start (``Available KV cache memory: ... GiB`` in its log) and that log wins. Re-calibrate them
when the pinned vLLM image moves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gpufleet.model.model_shape import ModelShape
from gpufleet.model.vllm_releases import VllmRelease
from gpufleet.model.vllm_version import VllmVersion
from gpufleet.planner.units import MiB
from gpufleet.planner.weights import WeightEstimate

# vLLM's KV cache block size on CUDA (``--block-size`` default 16): the cache is a whole number
# of blocks, and one sequence of max_model_len needs ceil(max_model_len / 16) of them.
BLOCK_SIZE = 16

# nvidia-smi's memory.total includes memory the driver reserves (``memory.reserved``), which
# CUDA never reports: the recorded DO H100 shows 81559 total, 480 reserved, 81079 free, and
# vLLM logs 79.19 GiB total for the same card. Where the reserve of a GPU was not measured
# (gpufleet.model.gpus: RTX 4000/6000 Ada) we assume 512 MiB (measured: 480 H100; derived from
# vLLM logs: 582 L40S, 606 H200; docs/evidence/gpu-catalogue.md).
DEFAULT_DRIVER_RESERVED_MIB = 512

# Outside the budget (vLLM v0.11 checks at start that free memory >= budget, after the CUDA
# context exists; ``Free memory on device ... is less than desired GPU memory utilization``).
# Measured on a DO-class H100 (driver 580, torch 2.11): 527 MiB of CUDA context, 595 MiB once
# cuBLAS has run. vLLM start-up logs show 0.53 GiB between CUDA total and free memory on an
# H100, 0.23-0.34 GiB on smaller cards, 0.6 GiB with tensor parallelism (NCCL communicators are
# made before the snapshot). We take 576 MiB, + 256 MiB when tp > 1.
CUDA_CONTEXT_MIB = 576
CUDA_CONTEXT_TP_EXTRA_MIB = 256
# CUDA graphs: v0.11 captures them after allocating the KV cache, from memory outside the
# budget; its logs report 0.54-0.68 GiB for 7-8B models ("Graph capturing finished ... took
# 0.67 GiB"). We scale 512 MiB per 32 layers; ``--enforce-eager`` captures none. vLLM >= 0.21
# estimates the same graphs before sizing the KV cache and takes that estimate from the budget;
# we take the same figure as its estimate (not calibrated against a 0.32 log yet).
CUDA_GRAPH_MIB_PER_LAYER = 16

# Inside the budget, besides the weights: the peak activation memory of vLLM's profile run (a
# forward pass of max_num_batched_tokens plus a sampler pass over min(max_num_seqs, tokens)
# rows of vocabulary-sized logits) and non-torch memory. vLLM 0.10/0.11 logs of 7-8B models
# print 1.02-1.43 GiB (activation + non-torch) with the small-GPU defaults (2048 batched tokens,
# 256 sequences) and 2.04 GiB with the >= 70 GiB defaults (8192, 1024). We take 1.25 GiB at
# 2048 tokens and 2 GiB at 8192, linear in between and beyond, times hidden_size / 4096 for
# wider models, plus NCCL and custom all-reduce buffers (0.21-1.38 GiB logged) when tp > 1.
ACTIVATION_MIB_AT_2048_TOKENS = 1280
ACTIVATION_MIB_AT_8192_TOKENS = 2048
NON_TORCH_TP_MIB = 512

# vLLM's scheduler defaults for ``vllm serve`` by GPU: ``VllmRelease.batch_tiers``.


def kv_bytes_per_token(shape: ModelShape, kv_cache_dtype: str = "auto", tp: int = 1) -> int:
    """K and V of every layer for one token, on one GPU of ``tp``. With tp above the number of
    KV heads vLLM replicates them: each GPU holds one."""
    dtype_bytes = 1 if kv_cache_dtype.startswith("fp8") else 2
    heads = max(1, shape.num_kv_heads // tp)
    return 2 * shape.num_layers * heads * shape.head_dim * dtype_bytes


def activation_reserve_bytes(shape: ModelShape, max_num_batched_tokens: int, tp: int) -> int:
    """Peak activation + non-torch memory inside the budget, per GPU (see the constants)."""
    slope = (ACTIVATION_MIB_AT_8192_TOKENS - ACTIVATION_MIB_AT_2048_TOKENS) / (8192 - 2048)
    act_mib = ACTIVATION_MIB_AT_2048_TOKENS + slope * max(0, max_num_batched_tokens - 2048)
    act_mib *= max(1.0, shape.hidden_size / 4096)
    return int(act_mib * MiB) + (NON_TORCH_TP_MIB * MiB if tp > 1 else 0)


def cuda_context_bytes(tp: int) -> int:
    """The CUDA context (and NCCL's, with tp > 1) per GPU, outside the budget."""
    return (CUDA_CONTEXT_MIB + (CUDA_CONTEXT_TP_EXTRA_MIB if tp > 1 else 0)) * MiB


def cuda_graph_bytes(shape: ModelShape, enforce_eager: bool = False) -> int:
    """The CUDA graphs per GPU (none with ``--enforce-eager``)."""
    return 0 if enforce_eager else CUDA_GRAPH_MIB_PER_LAYER * shape.num_layers * MiB


def vllm_defaults(usable_mib: int, gpu_name: str, release: VllmRelease,
                  version: VllmVersion) -> tuple[int, int, str]:
    """vLLM's ``vllm serve`` (max_num_batched_tokens, max_num_seqs) for this GPU, and whose."""
    tier = release.batch_defaults(usable_mib, gpu_name)
    floor = min(t.min_total_gib for t in release.batch_tiers if t.min_total_gib)
    words = f"with >= {tier.min_total_gib} GiB" if tier.min_total_gib else f"under {floor} GiB"
    return (tier.max_num_batched_tokens, tier.max_num_seqs,
            f"vLLM v{version.major}.{version.minor} default for GPUs {words}")


@dataclass(frozen=True)
class MemoryLayout:
    """Where one GPU's memory goes at one tensor parallel size. Bytes per GPU unless said."""

    usable: int                     # memory.total - memory.reserved
    budget: int                     # usable x gpu_memory_utilization
    weights: int
    load_peak: int                  # while loading (online fp8 loads 16-bit first)
    reserve: int                    # peak activation + non-torch, inside the budget
    graphs_inside: int              # the CUDA-graph estimate inside the budget (vLLM >= 0.21)
    outside: int                    # CUDA context (+ CUDA graphs when not inside), outside
    cuda_context: int
    kv_per_token: int               # whole model
    kv_per_token_per_gpu: int
    kv_left: int                    # budget - weights - reserve - graphs_inside; may be < 0
    kv_cache: int                   # kv_left, at least 0
    tokens: int                     # whole blocks of BLOCK_SIZE tokens
    one_sequence: int               # the KV cache one sequence of max_model_len needs
    concurrency: float              # tokens / max_model_len
    util_min: float                 # the utilization at which one such sequence just fits
    util_max: float                 # the highest that leaves room outside for context + graphs


def memory_layout(shape: ModelShape, weights: WeightEstimate, *, usable: int, util: float,
                  tp: int, max_num_batched_tokens: int, max_model_len: int,
                  kv_cache_dtype: str, enforce_eager: bool,
                  graphs_in_budget: bool = False) -> MemoryLayout:
    """The memory model above for one host's GPU (``usable`` bytes) and one set of settings;
    ``graphs_in_budget``: vLLM takes its CUDA-graph estimate from the budget (>= 0.21)."""
    budget = int(usable * util) if util > 0 else 0
    per_gpu = math.ceil(weights.total_bytes / tp)
    reserve = activation_reserve_bytes(shape, max_num_batched_tokens, tp)
    graphs = cuda_graph_bytes(shape, enforce_eager)
    inside = graphs if graphs_in_budget else 0
    outside = cuda_context_bytes(tp) + graphs - inside
    kv_token_gpu = kv_bytes_per_token(shape, kv_cache_dtype, tp)
    kv_left = budget - per_gpu - reserve - inside
    kv_cache = max(0, kv_left)
    tokens = kv_cache // (BLOCK_SIZE * kv_token_gpu) * BLOCK_SIZE
    one_sequence = math.ceil(max_model_len / BLOCK_SIZE) * BLOCK_SIZE * kv_token_gpu
    return MemoryLayout(
        usable=usable, budget=budget, weights=per_gpu,
        load_peak=math.ceil(weights.load_peak_bytes / tp), reserve=reserve,
        graphs_inside=inside, outside=outside,
        cuda_context=cuda_context_bytes(tp),
        kv_per_token=kv_bytes_per_token(shape, kv_cache_dtype, 1),
        kv_per_token_per_gpu=kv_token_gpu, kv_left=kv_left, kv_cache=kv_cache, tokens=tokens,
        one_sequence=one_sequence,
        concurrency=tokens / max_model_len if max_model_len else 0.0,
        util_min=math.ceil((per_gpu + reserve + inside + one_sequence) / usable * 100) / 100,
        util_max=math.floor((usable - outside) / usable * 100) / 100,
    )
