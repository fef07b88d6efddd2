"""Facts about the NVIDIA driver and GPUs, read with ``nvidia-smi``."""

from __future__ import annotations

from typing import Any

from pyinfra.api import FactBase
from typing_extensions import override

GPU_QUERY_FIELDS = ("index", "uuid", "name", "memory.total", "driver_version", "compute_cap")
GPU_QUERY = (
    f"nvidia-smi --query-gpu={','.join(GPU_QUERY_FIELDS)} --format=csv,noheader,nounits"
)

_MISSING = "##GPUFLEET_NO_NVIDIA_SMI##"
_EXIT = "##GPUFLEET_EXIT "


def parse_gpu_rows(lines: list[str]) -> list[dict[str, Any]]:
    """Parse the CSV rows of GPU_QUERY (``--format=csv,noheader,nounits``)."""
    gpus = []
    for line in lines:
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != len(GPU_QUERY_FIELDS):
            raise ValueError(f"unexpected nvidia-smi row: {line!r}")
        index, uuid, name, memory, driver, compute_cap = parts
        gpus.append({
            "index": int(index),
            "uuid": uuid,
            "name": name,
            "memory_mib": int(float(memory)),
            "driver_version": driver,
            "compute_capability": compute_cap,
        })
    return gpus


class NvidiaGpus(FactBase[dict]):
    """
    Returns what ``nvidia-smi`` says about this host's GPUs, telling apart a host without the
    driver (no ``nvidia-smi``), a driver that is installed but not working (``nvidia-smi`` exits
    non-zero, e.g. 9 when the kernel module is not loaded) and working GPUs. The fact command
    always exits 0 so that a broken driver fails the host in the operation that checks it, with
    an explanation, rather than in fact gathering.

    .. code:: python

        {
            "installed": True,
            "exit_code": 0,
            "error": None,
            "gpus": [
                {
                    "index": 0,
                    "uuid": "GPU-8dd6ea90-cada-acc3-987d-53d477d01733",
                    "name": "NVIDIA H100 80GB HBM3",
                    "memory_mib": 81559,
                    "driver_version": "580.159.04",
                    "compute_capability": "9.0",
                },
            ],
        }
    """

    @override
    def command(self) -> str:
        return (
            f"if ! command -v nvidia-smi >/dev/null 2>&1; then echo '{_MISSING}'; else "
            f"out=$({GPU_QUERY} 2>&1); rc=$?; echo \"{_EXIT}$rc\"; "
            "printf '%s\\n' \"$out\"; fi"
        )

    @staticmethod
    def default() -> dict:
        return {"installed": False, "exit_code": None, "error": None, "gpus": []}

    @override
    def process(self, output: list[str]) -> dict:
        if not output or output[0] == _MISSING:
            return self.default()
        exit_code = int(output[0][len(_EXIT):]) if output[0].startswith(_EXIT) else -1
        lines = [line for line in output[1:] if line.strip()]
        if exit_code != 0:
            return {"installed": True, "exit_code": exit_code, "error": " ".join(lines).strip(),
                    "gpus": []}
        try:
            gpus = parse_gpu_rows(lines)
        except ValueError as e:
            return {"installed": True, "exit_code": 0, "error": str(e), "gpus": []}
        return {"installed": True, "exit_code": 0, "error": None, "gpus": gpus}
