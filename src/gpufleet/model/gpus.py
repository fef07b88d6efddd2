"""DigitalOcean GPU droplet sizes, the GPUs in them, and what each quantization needs of a GPU.

Memory is what ``nvidia-smi --query-gpu=memory.total`` reports (MiB), so a named GPU plans
exactly like the same GPU read from a host's ``NvidiaGpus`` fact. ``reserved_mib`` is
``nvidia-smi``'s ``memory.reserved``: memory the driver keeps, which CUDA (and so vLLM's
``gpu_memory_utilization``) never sees. Where it was not measured it is ``None`` and the planner
uses its documented estimate (``gpufleet.planner.memory.DEFAULT_DRIVER_RESERVED_MIB``).

Sources, each number with its evidence: ``docs/evidence/gpu-catalogue.md``.

- ``gpu-h100x1-80gb`` and ``gpu-h100x8-640gb`` are in DigitalOcean's own OpenAPI spec.
- The H200, L40S, RTX 4000 Ada and RTX 6000 Ada slugs were seen only in third-party code
  (SkyPilot, dstack, gpuhunt): ``official=False``. Check ``GET /v2/sizes`` before relying on them.
- H100 memory and reserve: the recorded DO droplet (the lab replays the recording,
  ``lab/src/gpufleet_lab/recordings/h100-80gb-hbm3/``: total 81559 MiB, reserved 480 MiB).
  RTX 4000 Ada 20475 MiB: ``nvidia-smi`` on a DO droplet, quoted in a public deployment blog
  (``docs/evidence/rtx4000ada-blog.md``). H200 143771 MiB and L40S 46068 MiB: ``nvidia-smi``
  output quoted in public reports; their reserves (606 and 582 MiB) are derived from vLLM
  start-up logs that print the CUDA-visible total (139.81 and 44.42 GiB). RTX 6000 Ada
  49140 MiB: public ``nvidia-smi`` output.

List prices (``price_hourly``, USD per hour for the whole droplet) are DigitalOcean's own Droplet
pricing page, docs.digitalocean.com/products/droplets/details/pricing/: H100 $3.39, H100 (8x)
$23.92 and L40S $1.57 from its revision validated 2026-05-28; RTX 4000 $0.76 and RTX 6000 $1.89
from its revision validated 2025-04-22 (the 2026 text we could read stops before those two rows).
No DigitalOcean page we could read gives an H200 price: ``None``, shown as unknown, never guessed.
``GET /v2/sizes`` (``price_hourly``, and ``regions`` empty when the account cannot buy the size)
is the authority; ``gpufleet plan --gpu all`` uses it when a token is set.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Gpu:
    """``count`` identical GPUs of one host."""

    name: str                       # as nvidia-smi prints it, e.g. "NVIDIA H100 80GB HBM3"
    memory_mib: int                 # nvidia-smi memory.total
    compute_capability: str         # nvidia-smi compute_cap, e.g. "9.0"
    count: int = 1
    reserved_mib: int | None = None  # nvidia-smi memory.reserved; None: not measured

    @property
    def cc(self) -> tuple[int, int]:
        major, _, minor = self.compute_capability.strip().partition(".")
        return int(major), int(minor or 0)


@dataclass(frozen=True)
class DropletSize:
    slug: str
    gpu: Gpu
    official: bool                  # True: in DigitalOcean's OpenAPI spec; False: third-party only
    aliases: tuple[str, ...] = ()
    price_hourly: float | None = None  # USD per hour, DigitalOcean's list price; None: unknown


H100 = Gpu("NVIDIA H100 80GB HBM3", 81559, "9.0", reserved_mib=480)
H200 = Gpu("NVIDIA H200", 143771, "9.0", reserved_mib=606)
L40S = Gpu("NVIDIA L40S", 46068, "8.9", reserved_mib=582)
RTX_4000_ADA = Gpu("NVIDIA RTX 4000 Ada Generation", 20475, "8.9")
RTX_6000_ADA = Gpu("NVIDIA RTX 6000 Ada Generation", 49140, "8.9")

SIZES: tuple[DropletSize, ...] = (
    DropletSize("gpu-h100x1-80gb", H100, True, ("h100", "h100x1"), 3.39),
    DropletSize("gpu-h100x8-640gb", replace(H100, count=8), True, ("h100x8",), 23.92),
    DropletSize("gpu-h200x1-141gb", H200, False, ("h200", "h200x1")),
    DropletSize("gpu-h200x8-1128gb", replace(H200, count=8), False, ("h200x8",)),
    DropletSize("gpu-l40sx1-48gb", L40S, False, ("l40s", "l40sx1"), 1.57),
    DropletSize("gpu-4000adax1-20gb", RTX_4000_ADA, False,
                ("rtx4000ada", "rtx4000", "4000ada", "rtx4000adax1"), 0.76),
    DropletSize("gpu-6000adax1-48gb", RTX_6000_ADA, False,
                ("rtx6000ada", "rtx6000", "6000ada", "rtx6000adax1"), 1.89),
)
PRICE_SOURCE = "list prices in gpufleet's catalogue (DigitalOcean's Droplet pricing page)"


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_BY_KEY: dict[str, DropletSize] = {}
for _size in SIZES:
    for _name in (_size.slug, *_size.aliases):
        _BY_KEY[_key(_name)] = _size


def names() -> list[str]:
    """Every accepted name: slugs and aliases."""
    return [n for s in SIZES for n in (*s.aliases, s.slug)]


def lookup(name: str) -> DropletSize:
    """The droplet size for a slug or alias, case-insensitively (``H100x8``, ``rtx-4000-ada``)."""
    size = _BY_KEY.get(_key(name))
    if size is None:
        raise KeyError(f"unknown GPU {name!r}; known: {', '.join(names())}")
    return size


def gpus(name: str) -> list[Gpu]:
    return [lookup(name).gpu]


def reserved_mib_for(gpu_name: str) -> int | None:
    """The measured driver reserve of a GPU model, by its nvidia-smi name; None if unknown."""
    for size in SIZES:
        if _key(size.gpu.name) == _key(gpu_name):
            return size.gpu.reserved_mib
    return None


def gpu_from_dict(data: Mapping[str, Any]) -> Gpu:
    """One GPU from a fact row (``index, uuid, name, memory_mib, driver_version,
    compute_capability``) or a dict with ``count``/``memory_reserved_mib``."""
    try:
        name = str(data["name"])
        memory = int(data["memory_mib"])
        cc = str(data["compute_capability"])
    except KeyError as e:
        raise ValueError(f"a GPU needs name, memory_mib and compute_capability; missing {e}") from e
    reserved = data.get("memory_reserved_mib", data.get("reserved_mib"))
    return Gpu(name=name, memory_mib=memory, compute_capability=cc,
               count=int(data.get("count", 1)),
               reserved_mib=int(reserved) if reserved is not None else reserved_mib_for(name))


def group(gpu_list: list[Gpu]) -> list[Gpu]:
    """Merge identical GPUs into one entry with a count, keeping first-seen order."""
    out: list[Gpu] = []
    for gpu in gpu_list:
        for i, seen in enumerate(out):
            if replace(seen, count=1) == replace(gpu, count=1):
                out[i] = replace(seen, count=seen.count + gpu.count)
                break
        else:
            out.append(gpu)
    return out


def gpus_from_fact(fact: Mapping[str, Any]) -> list[Gpu]:
    """The GPUs of a host from its ``gpufleet.facts.nvidia.NvidiaGpus`` fact, grouped.

    Raises ValueError, saying why, for a host without a working driver or without GPUs."""
    if not fact.get("installed", True):
        raise ValueError("no NVIDIA driver: nvidia-smi is not installed")
    if fact.get("exit_code", 0) not in (0, None):
        raise ValueError(f"nvidia-smi failed with exit code {fact.get('exit_code')}: "
                         f"{fact.get('error') or 'no output'}")
    rows = fact.get("gpus") or []
    if not rows:
        raise ValueError(f"nvidia-smi lists no GPU{': ' + fact['error'] if fact.get('error') else ''}")
    return group([gpu_from_dict(row) for row in rows])


# -- what each quantization needs of a GPU ----------------------------------------------------


@dataclass(frozen=True)
class ComputeFloor:
    """The lowest compute capability a quantization runs on, and the one line users are told."""

    capability: tuple[int, int]
    reason: str


# vLLM's own floor: its installation docs ("GPU: compute capability 7.0 or higher").
VLLM_FLOOR = ComputeFloor((7, 0), "vLLM needs 7.0 or newer (Volta or a later GPU)")

# quantization (the spec's values) -> its floor. The one table: the spec
# (ServiceSpec.min_compute_capability), the planner's checks and the deploy's GPU check
# (gpufleet.deploy.service.gpu_requirements) all read it. Sources: each method's
# ``get_min_capability`` in vLLM's ``vllm/model_executor/layers/quantization/`` (awq.py: 75,
# "The AWQ kernel only supports Turing or newer GPUs"; gptq.py: 60; fp8.py: 80, with the
# weight-only Marlin path below 89) and vLLM's docs (features/quantization/fp8.md: W8A8 on 8.9+).
COMPUTE_FLOORS: dict[str, ComputeFloor] = {
    # auto of a bf16 checkpoint on a GPU without bfloat16: vLLM falls back to float16
    "auto": VLLM_FLOOR,
    "fp16": VLLM_FLOOR,
    "bf16": ComputeFloor((8, 0), "bfloat16 needs compute capability 8.0 (Ampere) or newer; use "
                                 "quantization fp16 on older GPUs"),
    # gpufleet's choice: vLLM accepts fp8 from 8.0 as weight-only W8A16 (Marlin), but the
    # speed-up users want from fp8 comes from the FP8 tensor cores of Ada and Hopper (W8A8)
    "fp8": ComputeFloor((8, 9), "fp8 needs compute capability 8.9 (Ada, Hopper) for W8A8 on FP8 "
                                "tensor cores; vLLM runs fp8 weight-only (W8A16, Marlin) from "
                                "8.0, but gpufleet requires 8.9 for fp8: use fp16, awq or gptq "
                                "on older GPUs"),
    "awq": ComputeFloor((7, 5), "awq needs compute capability 7.5 (Turing) or newer for vLLM's "
                                "AWQ kernels; use gptq on older GPUs"),
    # vLLM's GPTQ kernels run from 6.0, below vLLM's own floor
    "gptq": VLLM_FLOOR,
}


def compute_floor(quantization: str) -> ComputeFloor:
    """What ``quantization`` needs of a GPU (an unknown one: what vLLM needs)."""
    return COMPUTE_FLOORS.get(quantization, VLLM_FLOOR)
