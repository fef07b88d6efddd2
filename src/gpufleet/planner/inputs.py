"""What a plan is made from: one host's GPUs, as the planner sees them, and the spec's knobs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gpufleet.model.gpus import Gpu, gpu_from_dict
from gpufleet.model.vllm_releases import VllmRelease
from gpufleet.model.vllm_version import VllmVersion
from gpufleet.planner.memory import DEFAULT_DRIVER_RESERVED_MIB


@dataclass(frozen=True)
class HostGpus:
    """The GPUs of one host, planned as if every one were the smallest of them."""

    name: str                       # "NVIDIA H100 80GB HBM3", or "A + B" when mixed
    count: int
    memory_mib: int                 # nvidia-smi memory.total of the smallest GPU
    reserved_mib: int               # its driver reserve, measured or DEFAULT_DRIVER_RESERVED_MIB
    reserved_estimated: bool
    cc: tuple[int, int]             # the lowest compute capability
    notes: tuple[str, ...]

    @property
    def usable_mib(self) -> int:
        return self.memory_mib - self.reserved_mib


def _reserved_mib(gpu: Gpu) -> int:
    return gpu.reserved_mib if gpu.reserved_mib is not None else DEFAULT_DRIVER_RESERVED_MIB


def host_gpus(gpus: Sequence[Gpu | Mapping[str, Any]] | Gpu) -> HostGpus:
    """One host's GPUs from ``Gpu`` entries or ``NvidiaGpus`` fact rows."""
    items = [gpus] if isinstance(gpus, Gpu) else list(gpus)
    parsed = [g if isinstance(g, Gpu) else gpu_from_dict(g) for g in items]
    if not parsed:
        raise ValueError("no GPU to plan for")
    smallest = min(parsed, key=lambda g: g.memory_mib - _reserved_mib(g))
    names = list(dict.fromkeys(g.name for g in parsed))
    notes: tuple[str, ...] = ()
    if len({(g.name, g.memory_mib, g.compute_capability) for g in parsed}) > 1:
        notes = (f"mixed GPUs ({', '.join(names)}): planned for the smallest memory and lowest "
                 "compute capability; vLLM sizes every worker's KV cache to the smallest",)
    return HostGpus(name=" + ".join(names), count=sum(g.count for g in parsed),
                    memory_mib=smallest.memory_mib, reserved_mib=_reserved_mib(smallest),
                    reserved_estimated=smallest.reserved_mib is None,
                    cc=min(g.cc for g in parsed), notes=notes)


@dataclass(frozen=True)
class PlanSettings:
    """The spec's knobs a plan depends on (None: vLLM's default for the GPU or the model)."""

    quantization: str
    kv_cache_dtype: str
    util: float                     # gpu_memory_utilization (the release's default if unset)
    util_unset: bool                # the spec left it to vLLM's default
    max_model_len: int | None
    max_num_seqs: int | None
    max_num_batched_tokens: int | None
    required_gpus: int              # the spec's gpu_count
    enforce_eager: bool
    label: str
    version: VllmVersion            # the image's vLLM
    release: VllmRelease            # what that release does (gpufleet.model.vllm_releases)
    container_env: tuple[tuple[str, str], ...]
    kv_cache_memory: str            # auto | planned (pass --kv-cache-memory-bytes)
    notes: tuple[str, ...]          # what was assumed about the release
