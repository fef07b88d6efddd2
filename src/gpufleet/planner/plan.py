"""Will a model fit on these GPUs under vLLM, and with which flags? Pure functions, no I/O.

Inputs: a ``ModelShape`` (``gpufleet.clients.hub``), the GPUs of one host (fact rows or ``Gpu``),
and the knobs of the service spec. Output: a frozen ``Plan`` with every number in bytes, the
``vllm serve`` flags, and a verdict: ``fits``, ``fragile`` (it starts, but see the warnings) or
``refused`` (it would not start, or not serve one request of ``max_model_len``; the reasons
say why, in numbers).

This module composes the others: ``weights`` (what the weights weigh), ``memory`` (the memory
model and its constants), ``checks`` (reasons, warnings, notes), ``verdict``, and
``gpufleet.model.vllm_args`` (the flags); ``render`` prints plans side by side.
``plan_for_spec`` is the entry; ``plan_for_gpus`` plans explicit settings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from gpufleet.model import vllm_args
from gpufleet.model.gpus import Gpu
from gpufleet.model.model_shape import ModelShape
from gpufleet.model.spec import ServiceSpec
from gpufleet.model.vllm_releases import RELEASES, release_for_image
from gpufleet.model.vllm_version import PINNED_IMAGE
from gpufleet.planner import checks
from gpufleet.planner.checks import Findings, tp_allowed
from gpufleet.planner.inputs import HostGpus, PlanSettings, host_gpus
from gpufleet.planner.memory import DEFAULT_DRIVER_RESERVED_MIB, memory_layout, vllm_defaults
from gpufleet.planner.units import MiB, cc_text, gib
from gpufleet.planner.verdict import FITS, FRAGILE, REFUSED, check_capacity, verdict_of
from gpufleet.planner.weights import estimate_weights

# -- the plan ----------------------------------------------------------------------------------


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
    outside_budget_bytes_per_gpu: int  # CUDA context (+ CUDA graphs, v0.11), outside the budget
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
    vllm_version: str = ""          # the image's vLLM release the plan follows
    graphs_in_budget: bool = False  # vLLM takes its CUDA-graph estimate from the budget
    graph_estimate_bytes_per_gpu: int = 0   # that estimate, inside the budget (0: outside)
    kv_cache_memory_bytes: int = 0  # the KV cache in whole blocks: --kv-cache-memory-bytes

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


# -- planning ----------------------------------------------------------------------------------


def plan_for_gpus(
    shape: ModelShape,
    gpus: Sequence[Gpu | Mapping[str, Any]] | Gpu,
    *,
    quantization: str = "auto",
    kv_cache_dtype: str = "auto",
    gpu_memory_utilization: float | None = None,
    max_model_len: int | None = None,
    max_num_seqs: int | None = None,
    tensor_parallel_size: int | None = None,
    max_num_batched_tokens: int | None = None,
    required_gpus: int = 1,
    enforce_eager: bool = False,
    label: str | None = None,
    image: str = PINNED_IMAGE,
    container_env: Sequence[tuple[str, str]] = (),
    kv_cache_memory: str = "auto",
) -> Plan:
    """Plan ``shape`` on one host's ``gpus``, under the vLLM release ``image`` runs
    (``gpufleet.model.vllm_releases``; a tag that names no version: the pinned release).

    ``gpu_memory_utilization`` None: that release's default.
    ``max_model_len`` None: the model's max_position_embeddings (vLLM's default).
    ``max_num_seqs``/``max_num_batched_tokens`` None: the release's defaults for the GPU
    (v0.11: 1024/8192 on GPUs with >= 70 GiB that are not A100s, else 256/2048).
    ``tensor_parallel_size`` None: the smallest power of two that divides the GPU count and the
    attention and KV heads and gives a plan that fits; failing that one that is fragile; failing
    that the largest candidate, refused with its reasons.
    ``required_gpus``: the spec's gpu_count; fewer GPUs on the host is refused.
    ``container_env``: the spec's; VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS there is followed.
    ``kv_cache_memory`` "planned": the flags pass the planned KV cache as
    ``--kv-cache-memory-bytes``.
    """
    if quantization not in vllm_args.QUANTIZATION_FLAGS:
        raise ValueError(f"quantization must be one of {', '.join(vllm_args.QUANTIZATION_FLAGS)}"
                         f", got {quantization!r}")
    host = host_gpus(gpus)
    version, release, assumed = release_for_image(image)
    util = (gpu_memory_utilization if gpu_memory_utilization is not None
            else release.default_gpu_memory_utilization)
    settings = PlanSettings(
        quantization=quantization, kv_cache_dtype=kv_cache_dtype, util=util,
        util_unset=gpu_memory_utilization is None,
        max_model_len=max_model_len, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens, required_gpus=required_gpus,
        enforce_eager=enforce_eager, label=label or quantization, version=version,
        release=release, container_env=tuple(container_env), kv_cache_memory=kv_cache_memory,
        notes=(assumed,) if assumed else ())
    if tensor_parallel_size is not None:
        return _plan_at(shape, host, tensor_parallel_size, "set in the spec", settings)
    return _choose_tensor_parallel(shape, host, settings)


def _choose_tensor_parallel(shape: ModelShape, host: HostGpus, settings: PlanSettings) -> Plan:
    """Try the powers of two that divide the GPU count and the heads, smallest first."""
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
    notes = _tensor_parallel_notes(shape, host, chosen, tried)
    return replace(chosen, notes=(*notes, *chosen.notes))


def _tensor_parallel_notes(shape: ModelShape, host: HostGpus, chosen: Plan,
                           tried: list[Plan]) -> list[str]:
    """Why this tensor parallel size, what the others gave, and what the idle GPUs could do."""
    tp = chosen.tensor_parallel_size
    why = (f"tensor_parallel_size {tp} chosen: the smallest power of two "
           f"dividing {host.count} GPUs, {shape.num_attention_heads} attention and "
           f"{shape.num_kv_heads} KV heads")
    why += {FITS: " for which the plan fits", FRAGILE: " for which the plan is not refused",
            REFUSED: "; none fits, this is the largest"}[chosen.verdict]
    others = [f"tp {p.tensor_parallel_size} {p.verdict}: {summary(p)}"
              for p in tried if p is not chosen]
    if others:
        why += " (" + "; ".join(others) + ")"
    notes = [why]
    if chosen.fits and tp < host.count:
        notes.append(
            f"tp {tp} uses {tp} of {host.count} GPUs: fewer GPUs per engine means fewer "
            "all-reduces per token and leaves the rest for another replica; set "
            f"tensor_parallel_size (and gpu_count) to {host.count} to give one engine all of "
            "them and a larger KV cache")
    return notes


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


def _scheduler_settings(host: HostGpus, s: PlanSettings, found: Findings) -> tuple[int, int]:
    """(max_num_batched_tokens, max_num_seqs): the spec's, else vLLM's defaults for the GPU."""
    default_tokens, default_seqs, default_source = vllm_defaults(
        host.usable_mib, host.name, s.release, s.version)
    if s.util_unset and s.util != RELEASES[0].default_gpu_memory_utilization:
        found.notes.append(f"gpu_memory_utilization {s.util:g}: vLLM {s.version}'s default "
                           "(the spec leaves it unset)")
    if s.max_num_seqs is None:
        found.notes.append(f"max_num_seqs {default_seqs}: {default_source}")
    if host.reserved_estimated:
        found.notes.append(f"driver reserve of {host.name} not measured: assumed "
                           f"{DEFAULT_DRIVER_RESERVED_MIB} MiB of its {host.memory_mib} MiB")
    return s.max_num_batched_tokens or default_tokens, s.max_num_seqs or default_seqs


def _plan_at(shape: ModelShape, host: HostGpus, tp: int, tp_source: str,
             s: PlanSettings) -> Plan:
    """One plan at one tensor parallel size: the checks, the memory, the verdict, the flags."""
    found = Findings(notes=[*s.notes, *host.notes])
    batched, seqs = _scheduler_settings(host, s, found)
    weights = estimate_weights(shape, s.quantization, fp8_flag=s.release.online_fp8,
                               fp8_loads_16bit=s.release.online_fp8_loads_16bit)
    checks.check_gpu_count(host, s.required_gpus, found)
    checks.check_vllm_floor(host, found)
    found.reasons.extend(weights.problems)
    found.notes.extend(weights.notes)
    checks.check_quantization_floor(host, weights.compute, s.quantization, found)
    checks.check_kv_cache_dtype(host, s.kv_cache_dtype, found)
    checks.check_tensor_parallel(shape, host, tp, found)
    util_ok = checks.check_utilization(host, s.util, found)
    checks.check_model_len(shape, s.max_model_len, found)
    model_len = s.max_model_len or shape.max_position_embeddings
    graphs_in_budget = checks.check_graph_accounting(s.release, s.version, s.container_env,
                                                     found)

    layout = memory_layout(shape, weights, usable=host.usable_mib * MiB, util=s.util, tp=tp,
                           max_num_batched_tokens=batched, max_model_len=model_len,
                           kv_cache_dtype=s.kv_cache_dtype, enforce_eager=s.enforce_eager,
                           graphs_in_budget=graphs_in_budget)
    checks.check_memory(layout, weights, host, s.util, util_ok, model_len, found)
    check_capacity(layout, seqs, model_len, found)
    verdict = verdict_of(found)
    if tp_source:
        found.notes.insert(0, f"tensor_parallel_size {tp}: {tp_source}")
    kv_bytes = layout.tokens * layout.kv_per_token_per_gpu if verdict != REFUSED else 0
    passed = kv_bytes if kv_bytes and s.kv_cache_memory == "planned" else None
    if passed:
        found.notes.append(_kv_cache_memory_note(passed, s))
    flags = vllm_args.sizing_flags(
        tensor_parallel_size=tp, gpu_memory_utilization=s.util, max_model_len=model_len,
        max_num_seqs=seqs, quantization=s.quantization, kv_cache_dtype=s.kv_cache_dtype,
        release=s.release, prequantized=bool(shape.quantization), kv_cache_memory_bytes=passed)
    return Plan(
        label=s.label, model=shape.model, commit=shape.commit, gpu_name=host.name,
        gpu_count=host.count, memory_mib=host.memory_mib, reserved_mib=host.reserved_mib,
        reserved_estimated=host.reserved_estimated, compute_capability=cc_text(host.cc),
        quantization=s.quantization, weight_format=weights.fmt,
        kv_cache_dtype=s.kv_cache_dtype, tensor_parallel_size=tp, gpu_memory_utilization=s.util,
        max_model_len=model_len, max_num_seqs=seqs, max_num_batched_tokens=batched,
        parameters=shape.parameters, weight_bytes=weights.total_bytes,
        weight_bytes_per_gpu=layout.weights, load_peak_bytes_per_gpu=layout.load_peak,
        usable_bytes_per_gpu=layout.usable, budget_bytes_per_gpu=layout.budget,
        reserve_bytes_per_gpu=layout.reserve, outside_budget_bytes_per_gpu=layout.outside,
        kv_bytes_per_token=layout.kv_per_token,
        kv_bytes_per_token_per_gpu=layout.kv_per_token_per_gpu,
        kv_cache_bytes_per_gpu=layout.kv_cache, kv_cache_tokens=layout.tokens,
        max_concurrency=layout.concurrency, verdict=verdict, reasons=tuple(found.reasons),
        warnings=tuple(found.warnings), notes=tuple(found.notes), flags=tuple(flags),
        vllm_version=str(s.version), graphs_in_budget=graphs_in_budget,
        graph_estimate_bytes_per_gpu=layout.graphs_inside, kv_cache_memory_bytes=kv_bytes)


def _kv_cache_memory_note(kv_bytes: int, s: PlanSettings) -> str:
    return (f"kv_cache_memory planned: --kv-cache-memory-bytes {kv_bytes} ({gib(kv_bytes)}, "
            "whole blocks): vLLM allocates exactly this KV cache instead of sizing it from "
            f"gpu_memory_utilization, which still sets its start-up free-memory check "
            f"({s.util:g} x the GPU)")


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
    """Plan a service spec on one host, under the vLLM release of its image.
    ``quantization``/``gpu_memory_utilization`` replace the spec's (to compare);
    ``--max-num-batched-tokens`` and ``--enforce-eager`` are read from ``extra_args``."""
    batched = _extra_arg(spec.extra_args, "--max-num-batched-tokens")
    return plan_for_gpus(
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
        image=spec.image,
        container_env=spec.container_env,
        kv_cache_memory=spec.kv_cache_memory,
    )
