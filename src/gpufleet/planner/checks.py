"""The planner's checks: what refuses a plan (reasons), what makes it fragile (warnings), and
what it should say (notes). Each check appends to one ``Findings``, in the order users read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gpufleet.model.gpus import VLLM_FLOOR, compute_floor
from gpufleet.model.model_shape import ModelShape
from gpufleet.model.vllm_releases import GRAPH_ESTIMATE_ENV, VllmRelease
from gpufleet.model.vllm_version import VllmVersion
from gpufleet.planner.inputs import HostGpus
from gpufleet.planner.memory import CUDA_CONTEXT_MIB, MemoryLayout
from gpufleet.planner.units import MiB, cc_text, gib, mib
from gpufleet.planner.weights import WeightEstimate

OUTSIDE_MARGIN_NOTE = "lower gpu_memory_utilization or add --enforce-eager to extra_args"
LOAD_MARGIN_MIB = 512          # online fp8: bf16 load within 512 MiB of the card: fragile


@dataclass
class Findings:
    reasons: list[str] = field(default_factory=list)    # why refused
    warnings: list[str] = field(default_factory=list)   # why fragile
    notes: list[str] = field(default_factory=list)      # assumptions, advice; no verdict


# -- the GPUs and the settings -----------------------------------------------------------------


def check_gpu_count(host: HostGpus, required_gpus: int, found: Findings) -> None:
    if host.count < required_gpus:
        found.reasons.append(f"the host has {host.count} GPU(s), the spec's gpu_count needs "
                             f"{required_gpus}")


def check_vllm_floor(host: HostGpus, found: Findings) -> None:
    if host.cc < VLLM_FLOOR.capability:
        found.reasons.append(f"{host.name} has compute capability {cc_text(host.cc)}: "
                             f"{VLLM_FLOOR.reason}")


def check_quantization_floor(host: HostGpus, compute: str, quantization: str,
                             found: Findings) -> None:
    """``compute`` (what the weights need: the quantization, or the checkpoint's) against the
    GPU. Below vLLM's own floor ``check_vllm_floor`` has said it already."""
    floor = compute_floor(compute)
    if not VLLM_FLOOR.capability <= host.cc < floor.capability:
        return
    if compute == "bf16" and quantization == "auto":
        found.notes.append(f"{host.name} (compute capability {cc_text(host.cc)}) has no "
                           "bfloat16: vLLM resolves auto to float16; set quantization: fp16")
    else:
        found.reasons.append(f"{host.name} has compute capability {cc_text(host.cc)}: "
                             f"{floor.reason}")


def check_kv_cache_dtype(host: HostGpus, kv_cache_dtype: str, found: Findings) -> None:
    if kv_cache_dtype.startswith("fp8") and host.cc < (8, 9):
        found.notes.append(f"fp8 KV cache on compute capability {cc_text(host.cc)}: not every "
                           "vLLM attention backend supports it there; check the start-up log")


def tp_allowed(shape: ModelShape, tp: int) -> str | None:
    """Why vLLM cannot shard this model ``tp`` ways, or None."""
    if shape.num_attention_heads % tp:
        return (f"{shape.num_attention_heads} attention heads are not divisible by "
                f"tensor_parallel_size {tp}")
    if shape.num_kv_heads % tp and tp % shape.num_kv_heads:
        return (f"{shape.num_kv_heads} KV heads and tensor_parallel_size {tp}: one must divide "
                "the other")
    return None


def check_tensor_parallel(shape: ModelShape, host: HostGpus, tp: int, found: Findings) -> None:
    if tp > host.count:
        found.reasons.append(f"tensor_parallel_size {tp} needs {tp} GPUs; the host has "
                             f"{host.count}")
    problem = tp_allowed(shape, tp)
    if problem:
        found.reasons.append(problem)
    if host.count % tp:
        found.notes.append(f"tensor_parallel_size {tp} leaves {host.count % tp} of {host.count} "
                           "GPUs idle")


def check_utilization(host: HostGpus, util: float, found: Findings) -> bool:
    """Whether ``util`` is one vLLM can start with at all (the memory checks need one)."""
    if 0.0 < util < 1.0:
        return True
    found.reasons.append(
        f"gpu_memory_utilization {util:g} must be above 0 and below 1: vLLM checks at start "
        f"that free memory >= {util:g} x {host.usable_mib:,} MiB, and the CUDA context "
        f"(~{CUDA_CONTEXT_MIB} MiB) is already taken by then (RuntimeError: Engine core "
        "initialization failed)" if util >= 1.0 else
        f"gpu_memory_utilization {util:g} must be above 0")
    return False


def check_graph_accounting(release: VllmRelease, version: VllmVersion,
                           container_env: tuple[tuple[str, str], ...], found: Findings) -> bool:
    """Whether vLLM takes its CUDA-graph estimate from the budget: the release's default, or
    what the spec's container_env sets (vLLM reads ``bool(int(value))``, ``vllm/envs.py``)."""
    value = dict(container_env).get(GRAPH_ESTIMATE_ENV)
    setting = f"container_env {GRAPH_ESTIMATE_ENV}={value}"
    if not release.graph_estimate_env:
        if value is not None:
            found.notes.append(f"{setting} has no effect: vLLM {version} does not read it "
                               "(CUDA graphs are outside the budget)")
        return False
    if value is None:
        inside = release.graphs_in_budget
    else:
        try:
            inside = bool(int(value))
        except ValueError:
            found.reasons.append(f"{setting}: vLLM reads it as a whole number and stops at "
                                 "start; set 0 or 1")
            return release.graphs_in_budget
    if inside:
        why = setting if value is not None else f"{GRAPH_ESTIMATE_ENV} defaults to 1"
        found.notes.append(
            f"vLLM {version} takes its CUDA-graph estimate from the budget, so the KV cache is "
            f"smaller by it ({why}); "
            f"{GRAPH_ESTIMATE_ENV}=0 in container_env counts the graphs outside the budget")
    else:
        found.notes.append(
            f"{setting}: CUDA graphs are captured outside the budget, as in v0.11 (vLLM warns "
            "that gpu_memory_utilization may need lowering)")
    return inside


def check_model_len(shape: ModelShape, max_model_len: int | None, found: Findings) -> None:
    if max_model_len is None:
        found.notes.append(f"max_model_len not set: vLLM uses the model's "
                           f"max_position_embeddings ({shape.max_position_embeddings:,})")
    elif max_model_len > shape.max_position_embeddings:
        found.reasons.append(f"max_model_len {max_model_len:,} is beyond the model's "
                             f"max_position_embeddings {shape.max_position_embeddings:,}")


# -- memory ------------------------------------------------------------------------------------


def check_memory(layout: MemoryLayout, weights: WeightEstimate, host: HostGpus, util: float,
                 util_ok: bool, model_len: int, found: Findings) -> None:
    """Outside the budget, the online fp8 load, then weights and KV cache inside it."""
    if util_ok:
        _check_outside_budget(layout, host, util, found)
    if weights.loads_16bit_first:
        _check_online_fp8_load(layout, found)
    _check_weights_and_kv_cache(layout, host, util, model_len, found)


def _check_outside_budget(layout: MemoryLayout, host: HostGpus, util: float,
                          found: Findings) -> None:
    outside = layout.usable - layout.budget
    if outside < layout.cuda_context:
        found.reasons.append(
            f"gpu_memory_utilization {util:g} leaves {mib(outside)} outside the budget of "
            f"{host.usable_mib:,} MiB usable, less than the ~{mib(layout.cuda_context)} CUDA "
            f"context vLLM holds before it checks free memory: at most {layout.util_max:g}")
    elif outside < layout.outside:
        held = "the CUDA context" if layout.graphs_inside else "the CUDA context and CUDA graphs"
        found.warnings.append(
            f"only {mib(outside)} left outside the budget for {held} "
            f"(~{mib(layout.outside)}): graph capture may run out of memory, and any "
            f"other process on the GPU stops vLLM at start; {OUTSIDE_MARGIN_NOTE} "
            f"(<= {layout.util_max:g})")


def _check_online_fp8_load(layout: MemoryLayout, found: Findings) -> None:
    at_load = layout.load_peak + layout.cuda_context
    if at_load > layout.usable:
        found.reasons.append(
            f"online fp8 loads the 16-bit weights first: {gib(layout.load_peak)} per GPU + "
            f"{mib(layout.cuda_context)} CUDA context > {gib(layout.usable)} usable; use a "
            "pre-quantized fp8 checkpoint (loads at 1 byte per parameter) or more GPUs")
    elif at_load + LOAD_MARGIN_MIB * MiB > layout.usable:
        found.warnings.append(
            f"online fp8 loads the 16-bit weights first: {gib(layout.load_peak)} per GPU "
            f"leaves under {LOAD_MARGIN_MIB} MiB of {gib(layout.usable)} at load")


def _check_weights_and_kv_cache(layout: MemoryLayout, host: HostGpus, util: float,
                                model_len: int, found: Findings) -> None:
    how = (f"budget {gib(layout.budget)} = {util:g} x {host.usable_mib:,} MiB usable "
           f"({host.memory_mib:,} MiB - {host.reserved_mib} MiB driver reserve)")
    can_fit = layout.util_min <= layout.util_max
    graphs = (f" - CUDA graph estimate {gib(layout.graphs_inside)}" if layout.graphs_inside
              else "")
    if layout.weights > layout.budget:
        found.reasons.append(
            f"weights {gib(layout.weights)} per GPU do not fit the {how}"
            + (f"; one sequence of {model_len:,} tokens needs gpu_memory_utilization >= "
               f"{layout.util_min:.2f}" if can_fit else
               "; use a smaller quantization, more GPUs or a larger GPU"))
    elif layout.kv_left <= 0:
        found.reasons.append(
            f"no memory left for the KV cache: {how} - weights {gib(layout.weights)} - reserve "
            f"{gib(layout.reserve)} (peak activation, non-torch){graphs} = "
            f"{gib(layout.kv_left)}")
    elif layout.kv_cache < layout.one_sequence:
        fix = f"raise gpu_memory_utilization to >= {layout.util_min:.2f} or " if can_fit else ""
        found.reasons.append(
            f"KV cache too small for one sequence of max_model_len {model_len:,}: "
            f"{how} - weights {gib(layout.weights)} - reserve {gib(layout.reserve)}{graphs} "
            f"= {gib(layout.kv_cache)}, {layout.tokens:,} tokens at "
            f"{layout.kv_per_token_per_gpu:,} bytes/token; one sequence needs "
            f"{gib(layout.one_sequence)}: {fix}set max_model_len <= {layout.tokens:,}")
