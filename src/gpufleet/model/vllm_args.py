"""The arguments of ``vllm serve``, built in one place.

The spec (the sizing flags as the user states them), the planner (the sizing flags it computed
for one host) and the deploy (the whole command line of the unit) all build them here, so the
same settings always give the same flags, in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from gpufleet.model.vllm_releases import VllmRelease, quantization_value, release_for_image
from gpufleet.model.vllm_version import PINNED_IMAGE

if TYPE_CHECKING:  # the spec imports this module; at run time only its attributes are read
    from gpufleet.model.spec import ServiceSpec

# quantization -> the vLLM flag and value it maps to (None: let vLLM decide); the value of
# --quantization is the spec's release's spelling (vllm_releases.quantization_value)
QUANTIZATION_FLAGS: dict[str, tuple[str, str] | None] = {
    "auto": None,
    "fp16": ("--dtype", "float16"),
    "bf16": ("--dtype", "bfloat16"),
    "fp8": ("--quantization", "fp8"),
    "awq": ("--quantization", "awq"),
    "gptq": ("--quantization", "gptq"),
}


def quantization_flags(quantization: str, release: VllmRelease,
                       prequantized: bool = False) -> list[str]:
    """The flag and value of a spec's quantization, as ``release`` spells it."""
    flag = QUANTIZATION_FLAGS[quantization]
    if flag is None:
        return []
    name, value = flag
    if name == "--quantization":
        value = quantization_value(quantization, release, prequantized)
    return [name, value]


def sizing_flags(
    *,
    gpu_memory_utilization: float | None,
    quantization: str = "auto",
    kv_cache_dtype: str = "auto",
    tensor_parallel_size: int | None = None,
    max_model_len: int | None = None,
    max_num_seqs: int | None = None,
    release: VllmRelease | None = None,
    prequantized: bool = False,
    kv_cache_memory_bytes: int | None = None,
) -> list[str]:
    """The sizing flags of ``vllm serve``: tensor parallel size, memory utilization, lengths,
    quantization (spelled as ``release``, the pinned image's by default, wants it) and KV-cache
    dtype and size. A setting left None is not passed (vLLM chooses)."""
    flags: list[str] = []
    if tensor_parallel_size is not None:
        flags += ["--tensor-parallel-size", str(tensor_parallel_size)]
    if gpu_memory_utilization is not None:
        flags += ["--gpu-memory-utilization", f"{gpu_memory_utilization:g}"]
    if max_model_len is not None:
        flags += ["--max-model-len", str(max_model_len)]
    if max_num_seqs is not None:
        flags += ["--max-num-seqs", str(max_num_seqs)]
    flags += quantization_flags(quantization, release or release_for_image(PINNED_IMAGE)[1],
                                prequantized)
    if kv_cache_dtype != "auto":
        flags += ["--kv-cache-dtype", kv_cache_dtype]
    if kv_cache_memory_bytes is not None:
        flags += ["--kv-cache-memory-bytes", str(kv_cache_memory_bytes)]
    return flags


def spec_sizing_flags(spec: ServiceSpec, gpu_count: int | None = None) -> list[str]:
    """The sizing flags as the spec states them (the planner computes them per host): what the
    spec leaves unset is vLLM's to choose; tensor parallelism (the spec's, else ``gpu_count``)
    is passed only above 1. The spec knows no KV cache size (``kv_cache_memory: planned`` takes
    the plan's) nor whether the checkpoint is quantized (fp8 is spelled for a 16-bit one)."""
    tp = spec.tensor_parallel_size or gpu_count
    return sizing_flags(
        gpu_memory_utilization=spec.gpu_memory_utilization,
        quantization=spec.quantization,
        kv_cache_dtype=spec.kv_cache_dtype,
        tensor_parallel_size=tp if tp and tp > 1 else None,
        max_model_len=spec.max_model_len,
        max_num_seqs=spec.max_num_seqs,
        release=release_for_image(spec.image)[1],
    )


def serve_args(spec: ServiceSpec, *, gpu_count: int | None = None, revision: str | None = None,
               sizing: Sequence[str] | None = None) -> list[str]:
    """The arguments of ``vllm serve``: the model tag (positional; ``--model`` is deprecated
    since vLLM 0.11), then the flags. ``revision`` pins a resolved commit; ``sizing`` replaces
    the spec's own sizing flags (a plan's, from :func:`sizing_flags` too)."""
    args = [spec.model, "--revision", revision or spec.revision]
    args += ["--served-model-name", spec.name_served]
    args += ["--host", "0.0.0.0", "--port", str(spec.port)]
    args += spec_sizing_flags(spec, gpu_count) if sizing is None else list(sizing)
    args.append("--enable-prefix-caching" if spec.enable_prefix_caching
                else "--no-enable-prefix-caching")
    args += list(spec.extra_args)
    return args
