"""What the benchmark scripts share: the ``gpufleet-lab`` command and the lab's environment."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from gpufleet_lab import hosts, manager

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def lab(prefix: str, subnet: str, *args: str) -> None:
    """``gpufleet-lab --prefix P --subnet S ARGS`` (raises when it fails)."""
    subprocess.run([str(BIN / "gpufleet-lab"), "--prefix", prefix, "--subnet", subnet, *args],
                   cwd=ROOT, check=True, capture_output=True)


def lab_env(prefix: str, subnet: str) -> dict[str, str]:
    """This process's environment, the lab's on top, the venv's commands first on PATH."""
    env = {**os.environ, **manager.read_env(hosts.LabConfig(prefix=prefix, subnet=subnet))}
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    return env
