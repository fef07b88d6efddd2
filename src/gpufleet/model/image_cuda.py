"""Which CUDA build a ``vllm/vllm-openai`` tag is, the NVIDIA driver it needs, and which tag of
the same release a given driver runs (pure; the deploy and ``gpufleet plan`` ask it per host).

The tag convention flipped at v0.20.0 (the v0.20.0 release notes, quoted in
scalytics/ScalyticsCopilot#69; NVIDIA/Model-Optimizer PR #2042):

======================  ====================  =======================
release                 unsuffixed tag        suffixed tag
======================  ====================  =======================
>= v0.20.0              CUDA 13.0             ``-cu129``: CUDA 12.9
<= v0.19.x              CUDA 12 (12.8)        ``-cu130``: CUDA 13.0
======================  ====================  =======================

(v0.20.0 also ships ``-cu130``; after it that suffix no longer exists.) A host whose driver is
older than the build's floor cannot start the container: the NVIDIA container toolkit refuses
it (``nvidia-container-cli: requirement error: unsatisfied condition: cuda>=12.4``, vLLM issue
#5635), after the ~10 GB pull. The floors are the Linux driver of each toolkit's GA release.
Datacenter GPUs can also run a newer CUDA on some older driver branches through NVIDIA's
forward-compatibility package; whether these images use it is UNCONFIRMED, so the floor is the
GA driver (a host may be refused that would have run, never the other way round).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gpufleet.model.vllm_version import VllmVersion, image_tag, image_version, tag_variant

REPOSITORY = "vllm/vllm-openai"
PINNED = "pinned"              # image_cuda: run the spec's tag, refuse a driver too old for it
MATCH_DRIVER = "match_driver"  # image_cuda: run the build of the same release the driver runs
MODES = (PINNED, MATCH_DRIVER)
CUDA_13_DEFAULT = VllmVersion(0, 20, 0)  # the first release whose unsuffixed tag is CUDA 13


@dataclass(frozen=True)
class CudaBuild:
    cuda: str
    driver_floor: str   # the oldest Linux driver that runs it
    source: str


CUDA_13_0 = CudaBuild("13.0", "580.65.06", "CUDA 13.0 GA release notes (NVIDIA's, as quoted "
                      "by third-party repositories)")
CUDA_12_9 = CudaBuild("12.9", "575.51.03", "CUDA 12.9 GA release notes (NVIDIA's, as quoted "
                      "by third-party repositories)")
# UNCONFIRMED: the CUDA minor of the CUDA 12 images up to v0.19.x was not read from their
# Dockerfiles. v0.11.0 pins torch==2.8.0, whose PyPI build is CUDA 12.8, and vLLM's docs of that
# time say "vLLM contains pre-compiled C++ and CUDA (12.8) binaries"; 570.26 is CUDA 12.8 GA's
# driver (from memory). Older CUDA 12 images (12.1, 12.4) need less: the floor is on the safe
# side for them.
CUDA_12_8 = CudaBuild("12.8", "570.26", "UNCONFIRMED: torch 2.8.0's CUDA 12.8 build and the "
                      "CUDA 12.8 GA driver")


def _builds(version: VllmVersion) -> dict[str | None, CudaBuild]:
    """tag suffix -> build, for every CUDA build of one release (None: the unsuffixed tag)."""
    if version >= CUDA_13_DEFAULT:
        builds: dict[str | None, CudaBuild] = {None: CUDA_13_0, "cu129": CUDA_12_9}
        if version == CUDA_13_DEFAULT:
            builds["cu130"] = CUDA_13_0
        return builds
    return {None: CUDA_12_8, "cu130": CUDA_13_0}


def driver_version(text: str) -> tuple[int, ...]:
    """``"580.65.06"`` -> ``(580, 65, 6)`` (padded to three parts, so 570.26 == 570.26.0)."""
    parts = tuple(int(p) for p in re.findall(r"\d+", text))
    if not parts:
        raise ValueError(f"not a driver version: {text!r}")
    return (parts + (0, 0, 0))[:max(3, len(parts))]


def _repository(image: str) -> str:
    """The repository of an image reference, without a registry host and tag/digest."""
    name = image.split("@", 1)[0]
    if image_tag(name) is not None:
        name = name.rpartition(":")[0]
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        name = rest
    return name.removeprefix("library/")


def image_build(image: str) -> CudaBuild | None:
    """The CUDA build of a ``vllm/vllm-openai`` version tag, or None when the reference does
    not say (a digest, a tag that is not a version, a suffix not in the table, another
    repository)."""
    version = image_version(image)
    if version is None or _repository(image) != REPOSITORY:
        return None
    return _builds(version).get(tag_variant(image))


def _tag(image: str, variant: str | None) -> str:
    """The same release's tag with another build suffix."""
    name, _, tag = image.rpartition(":")
    base = tag.split("-", 1)[0]
    return f"{name}:{base}-{variant}" if variant else f"{name}:{base}"


def alternatives(image: str) -> list[tuple[str, CudaBuild]]:
    """The image's release in the other CUDA versions it is built for, newest CUDA first."""
    version, own = image_version(image), image_build(image)
    if version is None or own is None:
        return []
    other: dict[str, tuple[str, CudaBuild]] = {}
    for variant, build in _builds(version).items():
        if build.cuda != own.cuda:
            other.setdefault(build.cuda, (_tag(image, variant), build))
    return sorted(other.values(), key=lambda tb: driver_version(tb[1].driver_floor),
                  reverse=True)


def runs_on(build: CudaBuild, driver: str) -> bool:
    return driver_version(driver) >= driver_version(build.driver_floor)


@dataclass(frozen=True)
class DriverVerdict:
    image: str              # what the host runs: the spec's image, or the tag picked for it
    problem: str | None     # why the host cannot run it (one line), or None
    note: str | None        # what was decided or could not be checked, or None


def _describe(image: str, build: CudaBuild) -> str:
    return f"{image} (CUDA {build.cuda}, driver >= {build.driver_floor})"


def driver_verdict(image: str, driver: str | None, mode: str = PINNED) -> DriverVerdict:
    """Whether a host with NVIDIA ``driver`` runs ``image``, and with ``match_driver`` the tag
    of the same release it runs instead. ``driver`` None: not known (the GPU check says why)."""
    build = image_build(image)
    if build is None:
        return DriverVerdict(image, None, f"the CUDA build of {image} is not known (not a "
                                          f"{REPOSITORY} version tag): the driver is not "
                                          "checked against it")
    if driver is None or runs_on(build, driver):
        return DriverVerdict(image, None, None)
    fits = [(tag, b) for tag, b in alternatives(image) if runs_on(b, driver)]
    if mode == MATCH_DRIVER and fits:
        tag, other = fits[0]
        return DriverVerdict(tag, None, f"driver {driver} is older than {build.driver_floor}, "
                                        f"which {image} (CUDA {build.cuda}) needs: runs "
                                        f"{_describe(tag, other)} instead (image_cuda: "
                                        "match_driver)")
    head = (f"driver {driver} is older than {build.driver_floor}, which {image} "
            f"(CUDA {build.cuda}) needs: upgrade the driver")
    if fits and mode != MATCH_DRIVER:
        return DriverVerdict(image, f"{head}, or pin {_describe(*fits[0])}, or set image_cuda: "
                                    f"{MATCH_DRIVER}", None)
    lower = [(tag, b) for tag, b in alternatives(image)
             if driver_version(b.driver_floor) < driver_version(build.driver_floor)]
    if lower:
        tag, least = min(lower, key=lambda tb: driver_version(tb[1].driver_floor))
        head += f" (at least to {least.driver_floor} for {tag}, CUDA {least.cuda})"
    return DriverVerdict(image, head, None)


def fact_driver(fact: dict[str, Any]) -> str | None:
    """The driver version of an ``NvidiaGpus`` fact (one driver serves all GPUs of a host)."""
    gpus = fact.get("gpus") or []
    return str(gpus[0]["driver_version"]) if gpus and gpus[0].get("driver_version") else None
