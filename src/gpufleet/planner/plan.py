"""Will a model fit on these GPUs under vLLM, and with which flags? Pure functions, no I/O.

Inputs: a ``ModelShape`` (``gpufleet.clients.hub``), the GPUs of one host (fact rows or ``Gpu``),
and the knobs of the service spec. Output: a frozen ``Plan`` with every number in bytes, the
``vllm serve`` flags, and a verdict: ``fits``, ``fragile`` (it starts, but see the warnings) or
``refused`` (it would not start, or not serve one request of ``max_model_len``; the reasons
say why, in numbers).

The memory model is vLLM v0.11's (``vllm/v1/worker/gpu_worker.py``); ``docs/planner.md``
derives it and gives the sources. Per GPU:

    usable   = memory.total - memory.reserved      (what CUDA reports as total)
    budget   = usable x gpu_memory_utilization     (vLLM's ``requested_memory``)
    KV cache = budget - weights/tp - reserve        (reserve: peak activation + non-torch)
    outside the budget: the CUDA context (made before vLLM's start-up snapshot) and the CUDA
    graphs (v0.11 captures them after the KV cache is allocated).
    KV bytes per token = 2 (K and V) x layers x kv_heads x head_dim x dtype bytes, / tp

Every constant below says where it comes from. They are estimates: vLLM measures the real
values at start (``Available KV cache memory: ... GiB`` in its log) and that log wins.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from gpufleet.model.gpus import Gpu, gpu_from_dict
from gpufleet.model.model_shape import ModelShape
from gpufleet.model.spec import QUANTIZATION_FLAGS, ServiceSpec

MiB = 1 << 20
GiB = 1 << 30

# -- constants, with their sources -------------------------------------------------------------

# vLLM's KV cache block size on CUDA (``--block-size`` default 16): the cache is a whole number
# of blocks, and one sequence of max_model_len needs ceil(max_model_len / 16) of them.
BLOCK_SIZE = 16

# nvidia-smi's memory.total includes memory the driver reserves (``memory.reserved``), which
# CUDA never reports: the recorded DO H100 shows 81559 total, 480 reserved, 81079 free, and
# vLLM logs 79.19 GiB total for the same card. Where the reserve of a GPU was not measured
# (gpu_catalog: RTX 4000/6000 Ada) we assume 512 MiB (measured: 480 H100, 582 L40S, 606 H200).
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
# 0.67 GiB"). We scale 512 MiB per 32 layers; ``--enforce-eager`` captures none.
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

# vLLM v0.11's scheduler defaults for ``vllm serve`` (``EngineArgs._set_default_args``):
# GPUs with >= 70 GiB (CUDA total) whose name does not contain "a100" get 8192 batched
# tokens and 1024 sequences; the others 2048 and 256.
LARGE_GPU_MIB = 70 * 1024
DEFAULTS_LARGE = (8192, 1024)
DEFAULTS_COMPACT = (2048, 256)

# AWQ/GPTQ 4-bit: 0.5 byte per weight plus, per group of 128 weights, an fp16 scale and a 4-bit
# zero point (2.5 bytes / 128). Embeddings, lm_head and norms stay 16-bit.
QUANT_4BIT_BYTES_PER_PARAM = 0.5 + 2.5 / 128

# Verdict thresholds.
HEADROOM_MIN_FRACTION = 0.10   # KV cache under 10% of the budget: fragile
MIN_CONCURRENCY = 4.0          # fewer than 4 sequences of max_model_len at once: fragile
OUTSIDE_MARGIN_NOTE = "lower gpu_memory_utilization or add --enforce-eager to extra_args"
LOAD_MARGIN_MIB = 512          # online fp8: bf16 load within 512 MiB of the card: fragile

# Minimum compute capability per compute mode; gpufleet.model.spec holds the same for the spec.
MIN_CC = {"vllm": (7, 0), "bf16": (8, 0), "fp8": (8, 9), "awq": (7, 5)}

# -- built-in model shapes ---------------------------------------------------------------------

# An OFFLINE FALLBACK for ``gpufleet plan`` when the Hub cannot be asked (no network, no token,
# HF_HUB_OFFLINE=1): the shapes of a few well-known models, from their config.json and
# safetensors index. The commit is empty: these are not pinned to a revision, the Hub's
# answer (gpufleet.clients.hub) is always preferred.
_LLAMA3_8B = ModelShape(
    model="meta-llama/Meta-Llama-3-8B-Instruct", commit="", num_layers=32, hidden_size=4096,
    num_attention_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=8192,
    torch_dtype="bfloat16", parameters=8_030_261_248, weight_bytes=16_060_522_496, gated=True)
KNOWN_SHAPES: dict[str, ModelShape] = {
    _LLAMA3_8B.model: _LLAMA3_8B,
    # same architecture and weights size; 128k context (rope scaling "llama3")
    "meta-llama/Llama-3.1-8B-Instruct": replace(
        _LLAMA3_8B, model="meta-llama/Llama-3.1-8B-Instruct", max_position_embeddings=131072),
    "meta-llama/Meta-Llama-3-70B-Instruct": ModelShape(
        model="meta-llama/Meta-Llama-3-70B-Instruct", commit="", num_layers=80,
        hidden_size=8192, num_attention_heads=64, num_kv_heads=8, head_dim=128,
        max_position_embeddings=8192, torch_dtype="bfloat16", parameters=70_553_706_496,
        weight_bytes=141_107_412_992, gated=True),
}

# (vocab_size, tie_word_embeddings) of the models above. ModelShape has no vocab field yet;
# the planner reads ``vocab_size``/``tie_word_embeddings`` from the shape when it has them and
# this table otherwise. They matter because vLLM's fp8 and AWQ/GPTQ keep the embeddings and
# lm_head in 16 bits (1.96 GiB of Llama 3 8B).
KNOWN_VOCAB: dict[str, tuple[int, bool]] = {
    "meta-llama/Meta-Llama-3-8B-Instruct": (128256, False),
    "meta-llama/Meta-Llama-3-8B": (128256, False),
    "meta-llama/Llama-3.1-8B-Instruct": (128256, False),
    "meta-llama/Llama-3.1-8B": (128256, False),
    "meta-llama/Meta-Llama-3.1-8B-Instruct": (128256, False),
    "meta-llama/Meta-Llama-3-70B-Instruct": (128256, False),
    "meta-llama/Meta-Llama-3-70B": (128256, False),
    "meta-llama/Llama-3.1-70B-Instruct": (128256, False),
}


def known_shape(model: str) -> ModelShape | None:
    """The built-in shape of ``model`` (case-insensitive), or None."""
    for name, shape in KNOWN_SHAPES.items():
        if name.lower() == model.lower():
            return shape
    return None


# -- the plan ----------------------------------------------------------------------------------

FITS, FRAGILE, REFUSED = "fits", "fragile", "refused"


@dataclass(frozen=True)
class Plan:
    """One model x host x settings. Bytes are per GPU unless the name says otherwise."""

    label: str                      # column title, e.g. the quantization
    model: str
    commit: str
    gpu_name: str
    gpu_count: int                  # GPUs on the host
    memory_mib: int                 # nvidia-smi memory.total per GPU (smallest if mixed)
    reserved_mib: int               # driver reserve assumed (measured or estimated)
    reserved_estimated: bool
    compute_capability: str
    quantization: str               # as requested: auto|fp16|bf16|fp8|awq|gptq
    weight_format: str              # what vLLM loads, in words
    kv_cache_dtype: str
    tensor_parallel_size: int
    gpu_memory_utilization: float
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    parameters: int
    weight_bytes: int               # the whole model as vLLM holds it (all GPUs)
    weight_bytes_per_gpu: int
    load_peak_bytes_per_gpu: int    # while loading (online fp8 loads bf16 first)
    usable_bytes_per_gpu: int       # memory.total - memory.reserved
    budget_bytes_per_gpu: int       # usable x gpu_memory_utilization
    reserve_bytes_per_gpu: int      # peak activation + non-torch, inside the budget
    outside_budget_bytes_per_gpu: int  # CUDA context + CUDA graphs, outside the budget
    kv_bytes_per_token: int         # whole model
    kv_bytes_per_token_per_gpu: int
    kv_cache_bytes_per_gpu: int     # budget - weights - reserve, 0 if negative
    kv_cache_tokens: int            # whole blocks of BLOCK_SIZE tokens
    max_concurrency: float          # kv_cache_tokens / max_model_len
    verdict: str
    reasons: tuple[str, ...] = ()   # why refused
    warnings: tuple[str, ...] = ()  # why fragile
    notes: tuple[str, ...] = ()     # assumptions and advice; do not change the verdict
    flags: tuple[str, ...] = field(default=())  # vllm serve flags, in order

    @property
    def fits(self) -> bool:
        """vLLM would start and serve a sequence of max_model_len (``fits`` or ``fragile``)."""
        return self.verdict != REFUSED

    @property
    def bytes_per_parameter(self) -> float:
        return self.weight_bytes / self.parameters if self.parameters else 0.0

    @property
    def headroom_fraction(self) -> float:
        """The KV cache's share of the budget."""
        return self.kv_cache_bytes_per_gpu / self.budget_bytes_per_gpu \
            if self.budget_bytes_per_gpu > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("reasons", "warnings", "notes", "flags"):
            data[key] = list(data[key])
        data["fits"] = self.fits
        data["bytes_per_parameter"] = round(self.bytes_per_parameter, 4)
        data["headroom_fraction"] = round(self.headroom_fraction, 4)
        data["max_concurrency"] = round(self.max_concurrency, 2)
        return data


# -- helpers -----------------------------------------------------------------------------------


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def mib(n: float) -> str:
    return f"{n / MiB:,.0f} MiB"


def _cc_str(cc: tuple[int, int]) -> str:
    return f"{cc[0]}.{cc[1]}"


def kv_bytes_per_token(shape: ModelShape, kv_cache_dtype: str = "auto", tp: int = 1) -> int:
    """K and V of every layer for one token, on one GPU of ``tp``. With tp above the number of
    KV heads vLLM replicates them: each GPU holds one."""
    dtype_bytes = 1 if kv_cache_dtype.startswith("fp8") else 2
    heads = max(1, shape.num_kv_heads // tp)
    return 2 * shape.num_layers * heads * shape.head_dim * dtype_bytes


def _vocab(shape: ModelShape) -> tuple[int | None, bool]:
    vocab = getattr(shape, "vocab_size", None)
    if vocab:
        return int(vocab), bool(getattr(shape, "tie_word_embeddings", False))
    for name, known in KNOWN_VOCAB.items():
        if name.lower() == shape.model.lower():
            return known
    return None, False


def _checkpoint_quant(shape: ModelShape) -> str | None:
    q = (shape.quantization or "").strip().lower()
    return q or None


@dataclass(frozen=True)
class WeightEstimate:
    total_bytes: int                # the model as vLLM holds it after loading
    load_peak_bytes: int            # on the GPUs while loading (all GPUs together)
    fmt: str                        # in words
    compute: str                    # fp16|bf16|fp8|awq|gptq: what the GPU must support
    problems: tuple[str, ...] = ()  # refusals that do not depend on the GPU
    notes: tuple[str, ...] = ()


def estimate_weights(shape: ModelShape, quantization: str) -> WeightEstimate:
    """What the weights weigh under ``quantization`` (spec values), and why."""
    ckpt = _checkpoint_quant(shape)
    dtype = shape.torch_dtype.lower().replace("torch.", "")
    half = "bf16" if dtype in ("bfloat16", "bf16") else "fp16"
    if ckpt:
        # Already quantized: the files are what vLLM loads; --dtype only sets activations.
        notes: tuple[str, ...] = (
            f"the checkpoint is already quantized ({ckpt}): weights are the checkpoint's "
            f"{gib(shape.weight_bytes)} of files",)
        problems: tuple[str, ...] = ()
        ckpt_family = "awq" if ckpt.startswith("awq") else "gptq" if ckpt.startswith("gptq") \
            else ckpt
        if quantization in ("fp8", "awq", "gptq") and quantization != ckpt_family:
            problems = (f"the checkpoint is quantized with {ckpt}; vLLM refuses "
                        f"--quantization {quantization} for it: set quantization: auto",)
        compute = "fp8" if ckpt_family == "fp8" else ckpt_family if ckpt_family in (
            "awq", "gptq") else quantization if quantization in ("fp16", "bf16") else "fp16"
        return WeightEstimate(shape.weight_bytes, shape.weight_bytes,
                              f"{ckpt} checkpoint", compute, problems, notes)

    params = shape.parameters
    vocab, tied = _vocab(shape)
    if vocab:
        embeddings = vocab * shape.hidden_size * (1 if tied else 2)
        norms = (2 * shape.num_layers + 1) * shape.hidden_size
        unquantized = embeddings + norms
        split_note = (f"embeddings and lm_head ({embeddings:,} parameters, vocabulary {vocab:,}) "
                      f"and norms stay 16-bit")
    else:
        unquantized = 0
        split_note = ("vocabulary size unknown: all parameters counted as quantized, but vLLM "
                      "keeps embeddings and lm_head 16-bit, so the weights are larger than shown")
    linear = params - unquantized

    if quantization in ("auto", "fp16", "bf16"):
        mode = half if quantization == "auto" else quantization
        notes = ()
        if dtype in ("float32", "fp32"):
            notes = ("float32 checkpoint: vLLM loads it as 16-bit (auto picks float16 or "
                     "bfloat16), 2 bytes per parameter",)
        words = {"fp16": "float16", "bf16": "bfloat16"}[mode]
        src = "bf16" if half == "bf16" else "fp16"
        fmt = f"{src} checkpoint as {words}" if quantization != "auto" else f"{words} (auto)"
        return WeightEstimate(params * 2, params * 2, fmt, mode, (), notes)

    if quantization == "fp8":
        total = linear + unquantized * 2
        notes = (
            "online fp8 (vLLM --quantization fp8 on a 16-bit checkpoint): linear layers at "
            f"1 byte per parameter; {split_note}",
            "online fp8 loads the model at its original precision before quantizing "
            "(vLLM docs, features/quantization/fp8.md: 'you need enough memory to load the "
            "whole model'); that transient peak needs physical GPU memory, not the budget: "
            "vLLM measures the weights after quantization",
        )
        return WeightEstimate(total, params * 2, "online fp8 (linear layers)", "fp8", (), notes)

    # awq / gptq need a checkpoint made by AutoAWQ/GPTQModel/llm-compressor; vLLM cannot
    # quantize to them at load.
    total = math.ceil(linear * QUANT_4BIT_BYTES_PER_PARAM) + unquantized * 2
    problems = (f"--quantization {quantization} needs a checkpoint quantized with "
                f"{quantization} (config.json quantization_config.quant_method); "
                f"{shape.model} is a {dtype} checkpoint: point model at an {quantization.upper()} "
                "export of it. The numbers estimate such a checkpoint",)
    notes = (f"{quantization} 4-bit: {QUANT_4BIT_BYTES_PER_PARAM:.4f} bytes per linear weight "
             f"(0.5 + an fp16 scale and 4-bit zero per group of 128); {split_note}",)
    return WeightEstimate(total, total, f"{quantization} 4-bit (estimate)", quantization,
                          problems, notes)


def activation_reserve_bytes(shape: ModelShape, max_num_batched_tokens: int, tp: int) -> int:
    """Peak activation + non-torch memory inside the budget, per GPU (see the constants)."""
    slope = (ACTIVATION_MIB_AT_8192_TOKENS - ACTIVATION_MIB_AT_2048_TOKENS) / (8192 - 2048)
    act_mib = ACTIVATION_MIB_AT_2048_TOKENS + slope * max(0, max_num_batched_tokens - 2048)
    act_mib *= max(1.0, shape.hidden_size / 4096)
    return int(act_mib * MiB) + (NON_TORCH_TP_MIB * MiB if tp > 1 else 0)


def outside_budget_bytes(shape: ModelShape, tp: int, enforce_eager: bool = False) -> int:
    """CUDA context + CUDA graphs per GPU: memory vLLM uses beyond its budget."""
    context = CUDA_CONTEXT_MIB + (CUDA_CONTEXT_TP_EXTRA_MIB if tp > 1 else 0)
    graphs = 0 if enforce_eager else CUDA_GRAPH_MIB_PER_LAYER * shape.num_layers
    return (context + graphs) * MiB


def vllm_defaults(usable_mib: int, gpu_name: str) -> tuple[int, int, str]:
    """vLLM v0.11's ``vllm serve`` (max_num_batched_tokens, max_num_seqs) for this GPU."""
    if usable_mib >= LARGE_GPU_MIB and "a100" not in gpu_name.lower():
        return (*DEFAULTS_LARGE, "vLLM v0.11 default for GPUs with >= 70 GiB")
    return (*DEFAULTS_COMPACT, "vLLM v0.11 default for GPUs under 70 GiB")


def tp_allowed(shape: ModelShape, tp: int) -> str | None:
    """Why vLLM cannot shard this model ``tp`` ways, or None."""
    if shape.num_attention_heads % tp:
        return (f"{shape.num_attention_heads} attention heads are not divisible by "
                f"tensor_parallel_size {tp}")
    if shape.num_kv_heads % tp and tp % shape.num_kv_heads:
        return (f"{shape.num_kv_heads} KV heads and tensor_parallel_size {tp}: one must divide "
                "the other")
    return None


# -- the host ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Host:
    name: str
    count: int
    memory_mib: int
    reserved_mib: int
    reserved_estimated: bool
    cc: tuple[int, int]
    notes: tuple[str, ...]

    @property
    def usable_mib(self) -> int:
        return self.memory_mib - self.reserved_mib


def _host(gpus: Sequence[Gpu | Mapping[str, Any]] | Gpu) -> _Host:
    items = [gpus] if isinstance(gpus, Gpu) else list(gpus)
    parsed = [g if isinstance(g, Gpu) else gpu_from_dict(g) for g in items]
    if not parsed:
        raise ValueError("no GPU to plan for")
    count = sum(g.count for g in parsed)
    usable = [(g.memory_mib - (g.reserved_mib if g.reserved_mib is not None
                               else DEFAULT_DRIVER_RESERVED_MIB), g) for g in parsed]
    smallest = min(usable, key=lambda u: u[0])[1]
    estimated = smallest.reserved_mib is None
    reserved = smallest.reserved_mib if smallest.reserved_mib is not None \
        else DEFAULT_DRIVER_RESERVED_MIB
    names = list(dict.fromkeys(g.name for g in parsed))
    notes: tuple[str, ...] = ()
    if len({(g.name, g.memory_mib, g.compute_capability) for g in parsed}) > 1:
        notes = (f"mixed GPUs ({', '.join(names)}): planned for the smallest memory and lowest "
                 "compute capability; vLLM sizes every worker's KV cache to the smallest",)
    return _Host(name=" + ".join(names), count=count, memory_mib=smallest.memory_mib,
                 reserved_mib=reserved, reserved_estimated=estimated,
                 cc=min(g.cc for g in parsed), notes=notes)


# -- planning ----------------------------------------------------------------------------------


def plan(
    shape: ModelShape,
    gpus: Sequence[Gpu | Mapping[str, Any]] | Gpu,
    *,
    quantization: str = "auto",
    kv_cache_dtype: str = "auto",
    gpu_memory_utilization: float = 0.9,
    max_model_len: int | None = None,
    max_num_seqs: int | None = None,
    tensor_parallel_size: int | None = None,
    max_num_batched_tokens: int | None = None,
    required_gpus: int = 1,
    enforce_eager: bool = False,
    label: str | None = None,
) -> Plan:
    """Plan ``shape`` on one host's ``gpus``.

    ``max_model_len`` None: the model's max_position_embeddings (vLLM's default).
    ``max_num_seqs``/``max_num_batched_tokens`` None: vLLM v0.11's defaults for the GPU
    (1024/8192 on GPUs with >= 70 GiB that are not A100s, else 256/2048).
    ``tensor_parallel_size`` None: the smallest power of two that divides the GPU count and the
    attention and KV heads and gives a plan that fits; failing that one that is fragile; failing
    that the largest candidate, refused with its reasons.
    ``required_gpus``: the spec's gpu_count; fewer GPUs on the host is refused.
    """
    if quantization not in QUANTIZATION_FLAGS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_FLAGS)}, "
                         f"got {quantization!r}")
    host = _host(gpus)
    settings = _Settings(quantization=quantization, kv_cache_dtype=kv_cache_dtype,
                         util=gpu_memory_utilization, max_model_len=max_model_len,
                         max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                         required_gpus=required_gpus, enforce_eager=enforce_eager,
                         label=label or quantization)
    if tensor_parallel_size is not None:
        return _plan_at(shape, host, tensor_parallel_size, "set in the spec", settings)

    candidates = [tp for tp in (2 ** i for i in range(0, 11)) if tp <= host.count
                  and host.count % tp == 0 and tp_allowed(shape, tp) is None] or [1]
    tried: list[Plan] = []
    for tp in candidates:
        tried.append(_plan_at(shape, host, tp, "", settings))
        if tried[-1].verdict == FITS:
            break
    chosen = next((p for p in tried if p.verdict == FITS),
                  next((p for p in tried if p.verdict == FRAGILE), tried[-1]))
    if host.count == 1:
        return chosen
    why = (f"tensor_parallel_size {chosen.tensor_parallel_size} chosen: the smallest power of two "
           f"dividing {host.count} GPUs, {shape.num_attention_heads} attention and "
           f"{shape.num_kv_heads} KV heads")
    why += {FITS: " for which the plan fits", FRAGILE: " for which the plan is not refused",
            REFUSED: "; none fits, this is the largest"}[chosen.verdict]
    others = [f"tp {p.tensor_parallel_size} {p.verdict}: {summary(p)}"
              for p in tried if p is not chosen]
    if others:
        why += " (" + "; ".join(others) + ")"
    notes = [why]
    if chosen.fits and chosen.tensor_parallel_size < host.count:
        notes.append(
            f"tp {chosen.tensor_parallel_size} uses {chosen.tensor_parallel_size} of "
            f"{host.count} GPUs: fewer GPUs per engine means fewer all-reduces per token and "
            "leaves the rest for another replica; set tensor_parallel_size (and gpu_count) "
            f"to {host.count} to give one engine all of them and a larger KV cache")
    return replace(chosen, notes=(*notes, *chosen.notes))


def summary(p: Plan) -> str:
    """The plan's main number in a few words."""
    if p.weight_bytes_per_gpu > p.budget_bytes_per_gpu:
        return f"weights {gib(p.weight_bytes_per_gpu)}/GPU > budget {gib(p.budget_bytes_per_gpu)}"
    if p.reasons:
        if p.reasons[0].startswith(("KV cache too small", "no memory left")):
            return (f"KV cache {p.kv_cache_tokens:,} tokens < one {p.max_model_len:,}-token "
                    "sequence")
        return p.reasons[0].split(";")[0]
    return (f"{p.kv_cache_tokens:,} tokens, {p.max_concurrency:.2f} x {p.max_model_len:,}-token "
            "sequences")


@dataclass(frozen=True)
class _Settings:
    quantization: str
    kv_cache_dtype: str
    util: float
    max_model_len: int | None
    max_num_seqs: int | None
    max_num_batched_tokens: int | None
    required_gpus: int
    enforce_eager: bool
    label: str


def _plan_at(shape: ModelShape, host: _Host, tp: int, tp_source: str, s: _Settings) -> Plan:
    quantization, kv_cache_dtype, util = s.quantization, s.kv_cache_dtype, s.util
    max_model_len, max_num_seqs, required_gpus = s.max_model_len, s.max_num_seqs, s.required_gpus
    reasons: list[str] = []
    warnings: list[str] = []
    notes: list[str] = list(host.notes)

    usable = host.usable_mib * MiB
    default_tokens, default_seqs, default_src = vllm_defaults(host.usable_mib, host.name)
    batched = s.max_num_batched_tokens or default_tokens
    seqs = max_num_seqs or default_seqs
    if max_num_seqs is None:
        notes.append(f"max_num_seqs {seqs}: {default_src}")
    if host.reserved_estimated:
        notes.append(f"driver reserve of {host.name} not measured: assumed "
                     f"{DEFAULT_DRIVER_RESERVED_MIB} MiB of its {host.memory_mib} MiB")

    # -- the GPU and the settings --
    if host.count < required_gpus:
        reasons.append(f"the host has {host.count} GPU(s), the spec's gpu_count needs "
                       f"{required_gpus}")
    if host.cc < MIN_CC["vllm"]:
        reasons.append(f"{host.name} has compute capability {_cc_str(host.cc)}; vLLM needs "
                       "7.0 or newer")
    weights = estimate_weights(shape, quantization)
    reasons.extend(weights.problems)
    notes.extend(weights.notes)
    need = MIN_CC.get(weights.compute)
    if need and host.cc < need and host.cc >= MIN_CC["vllm"]:
        if weights.compute == "fp8":
            reasons.append(
                f"fp8 needs compute capability 8.9 (Ada, Hopper) for FP8 tensor cores; "
                f"{host.name} has {_cc_str(host.cc)}. vLLM can run fp8 checkpoints weight-only "
                "(W8A16, Marlin) from 7.5, but gpufleet requires 8.9 for fp8: use fp16 or awq")
        elif weights.compute == "bf16" and quantization == "auto":
            notes.append(f"{host.name} (compute capability {_cc_str(host.cc)}) has no "
                         "bfloat16: vLLM resolves auto to float16; set quantization: fp16")
        elif weights.compute == "bf16":
            reasons.append(f"bfloat16 needs compute capability 8.0 (Ampere); {host.name} has "
                           f"{_cc_str(host.cc)}: use quantization: fp16")
        else:
            reasons.append(f"{weights.compute} needs compute capability {_cc_str(need)}; "
                           f"{host.name} has {_cc_str(host.cc)}")
    if kv_cache_dtype.startswith("fp8") and host.cc < (8, 9):
        notes.append(f"fp8 KV cache on compute capability {_cc_str(host.cc)}: not every vLLM "
                     "attention backend supports it there; check the start-up log")
    if tp > host.count:
        reasons.append(f"tensor_parallel_size {tp} needs {tp} GPUs; the host has {host.count}")
    problem = tp_allowed(shape, tp)
    if problem:
        reasons.append(problem)
    if host.count % tp:
        notes.append(f"tensor_parallel_size {tp} leaves {host.count % tp} of {host.count} GPUs "
                     "idle")
    util_ok = 0.0 < util < 1.0
    if not util_ok:
        reasons.append(
            f"gpu_memory_utilization {util:g} must be above 0 and below 1: vLLM checks at start "
            f"that free memory >= {util:g} x {host.usable_mib:,} MiB, and the CUDA context "
            f"(~{CUDA_CONTEXT_MIB} MiB) is already taken by then (RuntimeError: Engine core "
            "initialization failed)" if util >= 1.0 else
            f"gpu_memory_utilization {util:g} must be above 0")
    model_len = max_model_len or shape.max_position_embeddings
    if max_model_len is None:
        notes.append(f"max_model_len not set: vLLM uses the model's max_position_embeddings "
                     f"({shape.max_position_embeddings:,})")
    elif max_model_len > shape.max_position_embeddings:
        reasons.append(f"max_model_len {max_model_len:,} is beyond the model's "
                       f"max_position_embeddings {shape.max_position_embeddings:,}")

    # -- memory, per GPU --
    budget = int(usable * util) if util > 0 else 0
    w_gpu = math.ceil(weights.total_bytes / tp)
    load_gpu = math.ceil(weights.load_peak_bytes / tp)
    reserve = activation_reserve_bytes(shape, batched, tp)
    outside = outside_budget_bytes(shape, tp, s.enforce_eager)
    context = (CUDA_CONTEXT_MIB + (CUDA_CONTEXT_TP_EXTRA_MIB if tp > 1 else 0)) * MiB
    kv_tok = kv_bytes_per_token(shape, kv_cache_dtype, 1)
    kv_tok_gpu = kv_bytes_per_token(shape, kv_cache_dtype, tp)
    kv_left = budget - w_gpu - reserve
    kv_bytes = max(0, kv_left)
    blocks = kv_bytes // (BLOCK_SIZE * kv_tok_gpu)
    tokens = blocks * BLOCK_SIZE
    one_seq = math.ceil(model_len / BLOCK_SIZE) * BLOCK_SIZE * kv_tok_gpu
    concurrency = tokens / model_len if model_len else 0.0
    # the utilization at which one sequence of max_model_len just fits
    util_min = math.ceil((w_gpu + reserve + one_seq) / usable * 100) / 100
    util_max = math.floor((usable - outside) / usable * 100) / 100

    if util_ok and usable - budget < context:
        reasons.append(
            f"gpu_memory_utilization {util:g} leaves {mib(usable - budget)} outside the budget "
            f"of {host.usable_mib:,} MiB usable, less than the ~{mib(context)} CUDA context "
            f"vLLM holds before it checks free memory: at most {util_max:g}")
    elif util_ok and usable - budget < outside:
        warnings.append(
            f"only {mib(usable - budget)} left outside the budget for the CUDA context and CUDA "
            f"graphs (~{mib(outside)}): graph capture may run out of memory, and any other "
            f"process on the GPU stops vLLM at start; {OUTSIDE_MARGIN_NOTE} "
            f"(<= {util_max:g})")
    if weights.load_peak_bytes > weights.total_bytes:
        if load_gpu + context > usable:
            reasons.append(
                f"online fp8 loads the 16-bit weights first: {gib(load_gpu)} per GPU + "
                f"{mib(context)} CUDA context > {gib(usable)} usable; use a pre-quantized fp8 "
                "checkpoint (loads at 1 byte per parameter) or more GPUs")
        elif load_gpu + context + LOAD_MARGIN_MIB * MiB > usable:
            warnings.append(f"online fp8 loads the 16-bit weights first: {gib(load_gpu)} per "
                            f"GPU leaves under {LOAD_MARGIN_MIB} MiB of {gib(usable)} at load")
    how = (f"budget {gib(budget)} = {util:g} x {host.usable_mib:,} MiB usable "
           f"({host.memory_mib:,} MiB - {host.reserved_mib} MiB driver reserve)")
    if w_gpu > budget:
        reasons.append(
            f"weights {gib(w_gpu)} per GPU do not fit the {how}"
            + (f"; one sequence of {model_len:,} tokens needs gpu_memory_utilization >= "
               f"{util_min:.2f}" if util_min <= util_max else
               "; use a smaller quantization, more GPUs or a larger GPU"))
    elif kv_left <= 0:
        reasons.append(
            f"no memory left for the KV cache: {how} - weights {gib(w_gpu)} - reserve "
            f"{gib(reserve)} (peak activation, non-torch) = {gib(kv_left)}")
    elif kv_bytes < one_seq:
        fix = f"raise gpu_memory_utilization to >= {util_min:.2f} or " \
            if util_min <= util_max else ""
        reasons.append(
            f"KV cache too small for one sequence of max_model_len {model_len:,}: "
            f"{how} - weights {gib(w_gpu)} - reserve {gib(reserve)} = {gib(kv_bytes)}, "
            f"{tokens:,} tokens at {kv_tok_gpu:,} bytes/token; one sequence needs "
            f"{gib(one_seq)}: {fix}set max_model_len <= {tokens:,}")

    if not reasons:
        if kv_bytes < HEADROOM_MIN_FRACTION * budget:
            warnings.append(
                f"KV cache {gib(kv_bytes)} is {kv_bytes / budget:.1%} of the {gib(budget)} "
                f"budget (< {HEADROOM_MIN_FRACTION:.0%}): little room beyond the weights")
        if concurrency < MIN_CONCURRENCY:
            warnings.append(
                f"only {concurrency:.2f} sequences of {model_len:,} tokens fit at once "
                f"({tokens:,} tokens): long requests queue or are preempted")
        if seqs > concurrency:
            notes.append(
                f"max_num_seqs {seqs} is above the {concurrency:.2f} sequences of "
                f"{model_len:,} tokens the cache holds at once: fine for shorter requests; when "
                "the cache fills vLLM preempts (and later recomputes) sequences")

    verdict = REFUSED if reasons else FRAGILE if warnings else FITS
    if tp_source:
        notes.insert(0, f"tensor_parallel_size {tp}: {tp_source}")
    flags: list[str] = ["--tensor-parallel-size", str(tp),
                        "--gpu-memory-utilization", f"{util:g}",
                        "--max-model-len", str(model_len),
                        "--max-num-seqs", str(seqs)]
    quant_flag = QUANTIZATION_FLAGS[quantization]
    if quant_flag is not None:
        flags += list(quant_flag)
    if kv_cache_dtype != "auto":
        flags += ["--kv-cache-dtype", kv_cache_dtype]

    return Plan(
        label=s.label, model=shape.model, commit=shape.commit, gpu_name=host.name,
        gpu_count=host.count, memory_mib=host.memory_mib, reserved_mib=host.reserved_mib,
        reserved_estimated=host.reserved_estimated, compute_capability=_cc_str(host.cc),
        quantization=quantization, weight_format=weights.fmt, kv_cache_dtype=kv_cache_dtype,
        tensor_parallel_size=tp, gpu_memory_utilization=util, max_model_len=model_len,
        max_num_seqs=seqs, max_num_batched_tokens=batched, parameters=shape.parameters,
        weight_bytes=weights.total_bytes, weight_bytes_per_gpu=w_gpu,
        load_peak_bytes_per_gpu=load_gpu, usable_bytes_per_gpu=usable,
        budget_bytes_per_gpu=budget, reserve_bytes_per_gpu=reserve,
        outside_budget_bytes_per_gpu=outside, kv_bytes_per_token=kv_tok,
        kv_bytes_per_token_per_gpu=kv_tok_gpu, kv_cache_bytes_per_gpu=kv_bytes,
        kv_cache_tokens=tokens, max_concurrency=concurrency, verdict=verdict,
        reasons=tuple(reasons), warnings=tuple(warnings), notes=tuple(notes),
        flags=tuple(flags))


def _extra_arg(extra_args: Sequence[str], flag: str) -> str | None:
    for i, arg in enumerate(extra_args):
        if arg == flag and i + 1 < len(extra_args):
            return extra_args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def plan_for_spec(
    spec: ServiceSpec,
    shape: ModelShape,
    gpus: Sequence[Gpu | Mapping[str, Any]] | Gpu,
    *,
    quantization: str | None = None,
    gpu_memory_utilization: float | None = None,
    label: str | None = None,
) -> Plan:
    """Plan a service spec on one host. ``quantization``/``gpu_memory_utilization`` replace the
    spec's (to compare); ``--max-num-batched-tokens`` and ``--enforce-eager`` are read from
    ``extra_args``."""
    batched = _extra_arg(spec.extra_args, "--max-num-batched-tokens")
    return plan(
        shape, gpus,
        quantization=quantization or spec.quantization,
        kv_cache_dtype=spec.kv_cache_dtype,
        gpu_memory_utilization=(gpu_memory_utilization if gpu_memory_utilization is not None
                                else spec.gpu_memory_utilization),
        max_model_len=spec.max_model_len,
        max_num_seqs=spec.max_num_seqs,
        tensor_parallel_size=spec.tensor_parallel_size,
        max_num_batched_tokens=int(batched) if batched and batched.isdigit() else None,
        required_gpus=spec.gpu_count,
        enforce_eager="--enforce-eager" in spec.extra_args,
        label=label,
    )


# -- the table ---------------------------------------------------------------------------------

_WIDTH = 34


def _flag_lines(flags: Sequence[str]) -> list[str]:
    lines: list[str] = []
    for item in flags:
        if item.startswith("--") or not lines:
            lines.append(item)
        else:
            lines[-1] += " " + item
    return lines


def render_table(plans: Sequence[Plan]) -> str:
    """Plans side by side (e.g. fp16 | fp8 | awq), then each plan's reasons, warnings, notes."""
    if not plans:
        return "(no plan)"
    first = plans[0]
    same_host = all((p.gpu_name, p.gpu_count, p.memory_mib) == (first.gpu_name, first.gpu_count,
                                                                 first.memory_mib) for p in plans)
    same_model = all(p.model == first.model for p in plans)
    head: list[str] = []
    if same_model:
        head.append(f"model  {first.model}" + (f" @ {first.commit[:12]}" if first.commit else "")
                    + f" ({first.parameters:,} parameters)")
    if same_host:
        head.append(f"GPUs   {first.gpu_count} x {first.gpu_name}, {first.memory_mib:,} MiB "
                    f"({first.memory_mib - first.reserved_mib:,} usable"
                    f"{', reserve estimated' if first.reserved_estimated else ''}), "
                    f"compute capability {first.compute_capability}")

    rows: list[tuple[str, list[str | list[str]]]] = []

    def row(name: str, values: list[str | list[str]]) -> None:
        rows.append((name, values))

    if not same_model:
        row("model", [p.model for p in plans])
    if not same_host:
        row("GPUs", [f"{p.gpu_count} x {p.gpu_name}" for p in plans])
    row("weights as", [p.weight_format for p in plans])
    row("tensor parallel", [str(p.tensor_parallel_size) for p in plans])
    row("weights / GPU", [f"{gib(p.weight_bytes_per_gpu)} ({p.bytes_per_parameter:.2f} B/param)"
                          for p in plans])
    row("budget / GPU", [f"{gib(p.budget_bytes_per_gpu)} (x {p.gpu_memory_utilization:g})"
                         for p in plans])
    row("reserve / GPU", [f"{gib(p.reserve_bytes_per_gpu)} + {gib(p.outside_budget_bytes_per_gpu)}"
                          " outside" for p in plans])
    row("KV / token", [f"{p.kv_bytes_per_token_per_gpu / 1024:,.0f} KiB/GPU "
                       f"({'8-bit' if p.kv_cache_dtype.startswith('fp8') else '16-bit'}, "
                       f"{p.kv_cache_dtype})" for p in plans])
    row("KV cache / GPU", [f"{gib(p.kv_cache_bytes_per_gpu)} ({p.headroom_fraction:.0%} of budget)"
                           for p in plans])
    row("tokens", [f"{p.kv_cache_tokens:,}" for p in plans])
    row("concurrency", [f"{p.max_concurrency:.2f} x {p.max_model_len:,} tokens" for p in plans])
    row("max_num_seqs", [str(p.max_num_seqs) for p in plans])
    row("verdict", [p.verdict.upper() if p.verdict == REFUSED else p.verdict for p in plans])
    row("flags", [_flag_lines(p.flags) for p in plans])

    name_w = max(len(n) for n, _ in rows) + 2
    widths = [max(_WIDTH, len(p.label) + 2) for p in plans]
    out = [*head, ""]
    out.append(" " * name_w + "".join(f"{p.label:<{w}}" for p, w in zip(plans, widths,
                                                                            strict=True)).rstrip())
    out.append(" " * name_w + "".join(("-" * (w - 2)).ljust(w) for w in widths).rstrip())
    for name, values in rows:
        cells = [v if isinstance(v, list) else [v] for v in values]
        height = max(len(c) for c in cells)
        for i in range(height):
            label = name if i == 0 else ""
            line = f"{label:<{name_w}}" + "".join(
                f"{(c[i] if i < len(c) else ''):<{w}}" for c, w in zip(cells, widths, strict=True))
            out.append(line.rstrip())
    for p in plans:
        if not (p.reasons or p.warnings or p.notes):
            continue
        out.append("")
        out.append(f"{p.label}: {p.verdict}")
        out.extend(f"  x {r}" for r in p.reasons)
        out.extend(f"  ! {w}" for w in p.warnings)
        out.extend(f"  - {n}" for n in p.notes)
    return "\n".join(out)
