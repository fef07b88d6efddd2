"""What each vLLM release does differently for sizing, in one table keyed by version (pure).

The planner's memory accounting, vLLM's defaults where the spec leaves a setting unset, and the
``--quantization`` spelling all come from the ``VllmRelease`` row of the spec's image
(``release_for_image``). A row holds from its ``since`` version until the next row's; every fact
says where it was read (``docs/planner.md`` cites the file and line of each).

Releases between two rows are planned with the older row. The first release of a change that was
read only in a later release is UNCONFIRMED, and its row starts at the release where it was
read; each row's ``sources`` says which.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from gpufleet.model.vllm_version import PINNED_VERSION, VllmVersion, image_version

# The environment variable vLLM >= 0.21 reads to put its CUDA-graph estimate in the budget.
GRAPH_ESTIMATE_ENV = "VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS"


@dataclass(frozen=True)
class BatchTier:
    """One line of vLLM's ``vllm serve`` scheduler defaults by GPU (``EngineArgs``)."""

    min_total_gib: int              # CUDA total memory of the GPU, GiB (2^30), at least
    max_num_batched_tokens: int
    max_num_seqs: int
    excludes_a100: bool = False     # GPUs whose name contains "a100" fall to the next tier

    def matches(self, total_mib: int, gpu_name: str) -> bool:
        return total_mib >= self.min_total_gib * 1024 and not (
            self.excludes_a100 and "a100" in gpu_name.lower())

    def words(self) -> str:
        if self.min_total_gib == 0:
            return "for other GPUs"
        return f"for GPUs with >= {self.min_total_gib} GiB" + (
            " that are not A100s" if self.excludes_a100 else "")


@dataclass(frozen=True)
class VllmRelease:
    """How one vLLM release sizes a GPU, from ``since`` until the next row."""

    since: VllmVersion
    default_gpu_memory_utilization: float   # CacheConfig.gpu_memory_utilization
    graph_estimate_env: bool        # GRAPH_ESTIMATE_ENV exists
    graphs_in_budget: bool          # the CUDA-graph estimate comes out of the budget by default
    online_fp8: str                 # --quantization value for fp8 of a 16-bit checkpoint
    online_fp8_loads_16bit: bool    # online fp8 holds the whole 16-bit model before quantizing
    batch_tiers: tuple[BatchTier, ...]  # the first that matches; the last matches every GPU
    sources: tuple[str, ...]

    def batch_defaults(self, total_mib: int, gpu_name: str) -> BatchTier:
        return next(t for t in self.batch_tiers if t.matches(total_mib, gpu_name))


V0_11 = VllmRelease(
    since=VllmVersion(0, 11, 0),
    default_gpu_memory_utilization=0.9,
    graph_estimate_env=False,
    graphs_in_budget=False,
    online_fp8="fp8",
    online_fp8_loads_16bit=True,
    batch_tiers=(BatchTier(70, 8192, 1024, excludes_a100=True), BatchTier(0, 2048, 256)),
    sources=("v0.11.0: vllm/v1/worker/gpu_worker.py, vllm/engine/arg_utils.py "
             "_set_default_args, vllm/config/cache.py (gpu_memory_utilization = 0.9), "
             "docs features/quantization/fp8.md",),
)
V0_20 = replace(
    V0_11, since=VllmVersion(0, 20, 0), online_fp8="fp8_per_tensor",
    sources=(*V0_11.sources, "v0.20.0: --quantization fp8_per_tensor documented "
             "(docs.vllm.ai/en/v0.20.0/features/quantization/online/, PR #38138); the first "
             "release with it is UNCONFIRMED"))
V0_21 = replace(
    V0_20, since=VllmVersion(0, 21, 0), default_gpu_memory_utilization=0.92,
    graph_estimate_env=True, graphs_in_budget=True,
    sources=(*V0_20.sources, "v0.21.0: CUDA-graph memory profiling on by default and "
             "gpu_memory_utilization 0.92 (PR #38284; vllm/envs.py 'Enabled by default as of "
             "v0.21.0')"))
V0_32 = replace(
    V0_21, since=VllmVersion(0, 32, 0), online_fp8_loads_16bit=False,
    batch_tiers=(BatchTier(160, 16384, 1024), *V0_21.batch_tiers),
    sources=(*V0_21.sources, "v0.32.0 (read in its source): online fp8 quantizes layer by "
             "layer as it loads, and a >= 160 GiB tier of 16384 batched tokens; the first "
             "releases with them are UNCONFIRMED"))

# oldest first
RELEASES: tuple[VllmRelease, ...] = (V0_11, V0_20, V0_21, V0_32)


def release_for(version: VllmVersion) -> VllmRelease:
    """The row that holds for ``version`` (the oldest row for anything older)."""
    return next((r for r in reversed(RELEASES) if r.since <= version), RELEASES[0])


def release_for_image(image: str) -> tuple[VllmVersion, VllmRelease, str | None]:
    """The version an image runs, its row, and what to say when either is assumed."""
    version = image_version(image)
    if version is None:
        return (PINNED_VERSION, release_for(PINNED_VERSION),
                f"image {image} names no vLLM version (a digest or another tag): planned as "
                f"the pinned vLLM {PINNED_VERSION}")
    if version < RELEASES[0].since:
        return (version, RELEASES[0],
                f"vLLM {version} is older than the oldest release the planner models: planned "
                f"as vLLM {RELEASES[0].since}")
    return version, release_for(version), None


def quantization_value(quantization: str, release: VllmRelease,
                       prequantized: bool = False) -> str:
    """The ``--quantization`` value for a spec's quantization (fp8, awq, gptq). A pre-quantized
    fp8 checkpoint keeps ``fp8``: vLLM refuses any other name than the checkpoint's method."""
    if quantization == "fp8" and not prequantized:
        return release.online_fp8
    return quantization
