"""Pure checks of a host's GPUs against what a service needs. No pyinfra, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gpufleet.model.gpus import VLLM_FLOOR


@dataclass(frozen=True)
class GpuRequirements:
    """What one host must have to run the service."""

    count: int = 1
    memory_mib: int = 0
    compute_capability: tuple[int, int] = VLLM_FLOOR.capability
    why_compute_capability: str = VLLM_FLOOR.reason


def parse_compute_capability(value: str) -> tuple[int, int]:
    major, _, minor = value.strip().partition(".")
    return int(major), int(minor or 0)


def _cc(value: tuple[int, int]) -> str:
    return f"{value[0]}.{value[1]}"


def describe_gpus(gpus: list[dict[str, Any]]) -> str:
    if not gpus:
        return "no GPU"
    names: dict[str, int] = {}
    for gpu in gpus:
        key = f"{gpu['name']} ({gpu['memory_mib']} MiB, compute capability {gpu['compute_capability']})"
        names[key] = names.get(key, 0) + 1
    return ", ".join(f"{n} x {k}" for k, n in names.items())


def check_gpus(fact: dict[str, Any], need: GpuRequirements, host: str) -> str | None:
    """Return why ``host`` cannot run the service (what was found, what is needed), or None."""
    if not fact.get("installed"):
        return (
            f"{host}: no NVIDIA driver: nvidia-smi is not installed. Needed: {need.count} NVIDIA "
            "GPU(s) with a working driver. Use a GPU droplet image that ships the driver "
            "(DigitalOcean's 'AI/ML Ready' images) or install the driver "
            "(e.g. apt install nvidia-driver-<branch>-server) and reboot, then re-run."
        )
    if fact.get("exit_code") != 0:
        error = fact.get("error") or "no output"
        hint = (
            "The driver is installed but not loaded: reboot the droplet, or check "
            "`dmesg | grep -i nvidia` and that the driver matches the running kernel."
            if fact.get("exit_code") == 9
            else "Run nvidia-smi on the host to see what is wrong."
        )
        return f"{host}: nvidia-smi failed with exit code {fact.get('exit_code')}: {error} {hint}"
    gpus = fact.get("gpus") or []
    found = describe_gpus(gpus)
    if len(gpus) < need.count:
        return (f"{host}: found {len(gpus)} GPU(s) ({found}), the service needs {need.count}. "
                "Use a larger droplet size or lower gpu_count/tensor_parallel_size.")
    reasons = []
    old = [g for g in gpus
           if parse_compute_capability(g["compute_capability"]) < need.compute_capability]
    if old:
        g = old[0]
        reasons.append(f"GPU {g['index']} {g['name']} has compute capability "
                       f"{g['compute_capability']}, the service needs "
                       f"{_cc(need.compute_capability)}: {need.why_compute_capability}")
    small = [g for g in gpus if g["memory_mib"] < need.memory_mib]
    if small:
        g = small[0]
        reasons.append(f"GPU {g['index']} {g['name']} has {g['memory_mib']} MiB, the service "
                       f"needs {need.memory_mib} MiB per GPU: use a quantization that needs less "
                       "memory or a larger GPU")
    if reasons:
        return f"{host}: " + "; ".join(reasons) + "."
    return None
