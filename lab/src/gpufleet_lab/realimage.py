"""The lab's REAL ``vllm/vllm-openai`` image: upstream vLLM's server (``vllm-cpu``) on Debian.

Not NVIDIA's CUDA image (that needs a GPU): a Debian bookworm root filesystem with vLLM's own
server code built for CPUs, at the product's pinned version (``gpufleet_lab.realvllm``),
published under the pinned name so that lab hosts ``docker pull`` and run it exactly as a
droplet runs the real image: ``vllm serve ...`` on PATH, the Hugging Face cache at
``/root/.cache/huggingface``, the compile cache at ``/root/.cache/vllm``.

What is in it, and why (each measured; ``docs/evidence/real-vllm.md``):

* ``python3`` + ``python3-venv``: a venv at ``/opt/vllm`` filled offline from the cached wheels,
  without torchvision, torchaudio, torchcodec (they fail to import beside the CPU torch) and
  triton (1 GB, no CPU backend);
* ``libnuma1`` (``vllm._C`` links it), ``g++`` and ``python3-dev`` (the CPU worker compiles its
  graph with torch's inductor at start);
* ``VLLM_CPU_KVCACHE_SPACE=1``: the CPU backend sizes its KV cache from this (GiB) instead of
  reserving ``--gpu-memory-utilization`` of the machine's memory, so the deploy's own flag
  passes through unchanged;
* usage statistics off (``VLLM_NO_USAGE_STATS``, ``DO_NOT_TRACK``): the lab never calls out;
* ``/usr/local/bin/vllm``: the two changes to vLLM's arguments, each with a log line; it then
  runs ``/opt/vllm/bin/vllm`` with everything else as given.

  - CPUs have no fp8 kernels (vLLM 0.32.0 on CPU: ``_C::static_scaled_fp8_quant() expected at
    most 0 argument(s)``), so ``--quantization fp8``/``fp8_per_tensor`` is dropped. The flag
    itself is checked against vLLM's real parser by the contract test.
  - ``--enforce-eager`` is added. On two CPU cores torch.compile's warm-up is 15-25 s of every
    start, and 0.32.0's CPU worker cannot reload its own compile cache (``Compiling model again
    due to a load failure ... 'function' object has no attribute 'finalize_loading'``), so it
    is paid on every restart. Measured on this machine with the tiny model: healthy after 44-56 s
    compiled, 30-32 s eager. The e2e tests restart real servers about fifteen times.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpufleet_lab import hosts, images, realvllm

SUITE = "bookworm"
PACKAGES = ("python3", "python3-venv", "python3-dev", "g++", "libnuma1")
RECIPE_REV = 1  # bump when the recipe changes (invalidates the cached layer)
COMPRESSLEVEL = 1  # a 2.5 GB layer: level 1 is several times faster and only ~10 % larger
# the registry serves the layer as plain tar (a pull then skips gunzip: see README, The lab)
SERVE_UNCOMPRESSED = True
VENV = "/opt/vllm"

ENTRYPOINT_WRAPPER = f"""#!/bin/sh
# gpufleet lab: upstream vLLM ({realvllm.PACKAGE}) on a CPU. CPUs have no fp8 kernels, so
# --quantization fp8 is dropped here, and the server runs eager (torch.compile on a CPU costs
# every start 15-25 s); every other argument reaches vLLM as given.
if [ "$1" = serve ]; then
  shift
  n=$#
  while [ "$n" -gt 0 ]; do
    a=$1; shift; n=$((n - 1))
    case "$a" in
      --quantization=fp8|--quantization=fp8_per_tensor|-q=fp8)
        echo "gpufleet lab: CPU build, no fp8 kernels: dropped $a" >&2; continue ;;
      --quantization|-q)
        case "$1" in fp8|fp8_per_tensor)
          echo "gpufleet lab: CPU build, no fp8 kernels: dropped $a $1" >&2
          shift; n=$((n - 1)); continue ;;
        esac ;;
    esac
    set -- "$@" "$a"
  done
  echo "gpufleet lab: CPU build, added --enforce-eager" >&2
  set -- serve "$@" --enforce-eager
fi
exec {VENV}/bin/vllm "$@"
"""

ENV = (
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
    "PYTHONUNBUFFERED=1",
    "VLLM_USAGE_SOURCE=production-docker-image",
    *(f"{k}={v}" for k, v in realvllm.NO_TELEMETRY.items()),
    "VLLM_CPU_KVCACHE_SPACE=1",
)
STRIP_PATHS = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
               "usr/share/lintian", "var/cache/apt", "var/lib/apt/lists", "var/log", "tmp/wheels")


def image_config(diff_id: str) -> dict[str, Any]:
    return {
        "architecture": "amd64",
        "os": "linux",
        "created": images.CREATED,
        "author": "gpufleet lab",
        "config": {
            "Env": list(ENV),
            "Entrypoint": ["vllm", "serve"],
            "Cmd": None,
            "WorkingDir": "/vllm-workspace",
            "ExposedPorts": {"8000/tcp": {}},
            "Labels": {
                "org.opencontainers.image.title": "vllm-openai (gpufleet lab, upstream vLLM on CPU)",
                "org.opencontainers.image.version": realvllm.VERSION,
                "io.gpufleet.lab.engine": "real",
                "io.gpufleet.lab.vllm-package": realvllm.PACKAGE,
            },
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": images.CREATED,
                     "created_by": f"gpufleet lab: mmdebstrap {SUITE} +{','.join(PACKAGES)} "
                                   f"+ {VENV} ({realvllm.PACKAGE})"}],
    }


def inputs_key(mirrors: Sequence[str], wheels: Sequence[Path]) -> str:
    h = hashlib.sha256()
    h.update(f"rev={RECIPE_REV}\nsuite={SUITE}\npackages={','.join(PACKAGES)}\n".encode())
    h.update(("mirrors=" + "|".join(mirrors) + "\n").encode())
    h.update(("wheels=" + ",".join(f"{w.name}:{w.stat().st_size}" for w in wheels)).encode())
    h.update(ENTRYPOINT_WRAPPER.encode())
    return h.hexdigest()[:16]


def _stage_wheels(wheels: Sequence[Path], dest: Path) -> None:
    dest.mkdir(parents=True)
    for wheel in wheels:
        try:
            os.link(wheel, dest / wheel.name)
        except OSError:
            shutil.copyfile(wheel, dest / wheel.name)


def build_rootfs(dest: Path, mirrors: Sequence[str], wheels: Sequence[Path],
                 log: images.Logger = print) -> None:
    """mmdebstrap the rootfs into ``dest`` and install vLLM into ``/opt/vllm`` inside it."""
    if os.geteuid() != 0:
        raise PermissionError("building the real vLLM image needs root (mmdebstrap)")
    stage = dest.with_name("wheels")
    _stage_wheels(wheels, stage)
    site = f"{VENV}/lib/python3.11/site-packages"
    # the glob is expanded inside the root filesystem, not by the hook's shell outside it
    pip = (f"chroot \"$1\" sh -c '{VENV}/bin/pip install -q --no-index --no-deps "
           "--no-cache-dir --disable-pip-version-check /tmp/wheels/*.whl'")
    cmd = ["mmdebstrap", "--quiet", "--variant=essential", "--include=" + ",".join(PACKAGES),
           *[f"--dpkgopt=path-exclude={p}" for p in images.DPKG_EXCLUDES]]
    merged = Path("/usr/share/mmdebstrap/hooks/merged-usr")
    if merged.is_dir():
        cmd.append(f"--hook-dir={merged}")
    cmd += ['--customize-hook=mkdir -p "$1/tmp/wheels"',
            f"--customize-hook=sync-in {stage} /tmp/wheels",
            f'--customize-hook=chroot "$1" python3 -m venv {VENV}',
            f"--customize-hook={pip}",
            SUITE, str(dest), *mirrors]
    log(f"[realimage] mmdebstrap {SUITE} +{','.join(PACKAGES)} + {realvllm.PACKAGE}")
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(images.SOURCE_DATE_EPOCH))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    shutil.rmtree(stage, ignore_errors=True)
    if proc.returncode != 0:
        raise hosts.LabError(f"building the real vLLM image failed (mmdebstrap rc "
                             f"{proc.returncode}): {proc.stderr[-1500:]}")
    for rel in STRIP_PATHS:
        path = dest / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
    for rel in ("var/log", "var/cache/apt", "tmp"):
        (dest / rel).mkdir(parents=True, exist_ok=True)
    os.chmod(dest / "tmp", 0o1777)
    realvllm.write_alias(dest / site.lstrip("/"))
    wrapper = dest / "usr/local/bin/vllm"
    wrapper.write_text(ENTRYPOINT_WRAPPER)
    wrapper.chmod(0o755)
    (dest / "vllm-workspace").mkdir(exist_ok=True)
    dnt = dest / "root/.config/vllm/do_not_track"
    dnt.parent.mkdir(parents=True, exist_ok=True)
    dnt.touch()


def build_real_image(image_dir: Path, cache_dir: Path = hosts.CACHE_DIR, *,
                     tag: str = images.DEFAULT_TAG, mirrors: Sequence[str] | None = None,
                     log: images.Logger = print) -> images.ImageInfo:
    """Build (or reuse from ``image_dir``) the real vLLM image for ``vllm/vllm-openai:tag``."""
    wheels = realvllm.wanted_wheels(realvllm.download_wheels(cache_dir, log))
    mirrors = list(images.mirror_lines() if mirrors is None else mirrors)
    blobs_dir = Path(image_dir) / "blobs"
    layer_file = Path(image_dir) / "layers" / f"real-{inputs_key(mirrors, wheels)}.json"
    with hosts.file_lock(Path(image_dir) / ".lock"):
        layer = json.loads(layer_file.read_text()) if layer_file.is_file() else None
        if layer and not (blobs_dir / "sha256" / layer["layer_digest"][7:]).is_file():
            layer = None
        if layer is None:
            layer = _build_layer(Path(image_dir), blobs_dir, mirrors, wheels, log)
            layer_file.parent.mkdir(parents=True, exist_ok=True)
            layer_file.write_text(json.dumps(layer, indent=2, sort_keys=True) + "\n")
        if SERVE_UNCOMPRESSED:
            layer = images.uncompressed_layer(layer, blobs_dir)
        return images.assemble_image(blobs_dir, layer, tag=tag, version=realvllm.VERSION,
                                     config=image_config(layer["diff_id"]))


def _build_layer(image_dir: Path, blobs_dir: Path, mirrors: Sequence[str],
                 wheels: Sequence[Path], log: images.Logger) -> dict[str, Any]:
    t0 = time.monotonic()
    work = image_dir / f"real-build.{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        build_rootfs(work / "rootfs", mirrors, wheels, log)
        t1 = time.monotonic()
        layer = images.write_layer(work / "rootfs", blobs_dir, compresslevel=COMPRESSLEVEL)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"[realimage] rootfs {t1 - t0:.0f}s, layer {time.monotonic() - t1:.0f}s: "
        f"{layer['uncompressed_size'] / 1e9:.2f} GB tar, {layer['layer_size'] / 1e9:.2f} GB gzip")
    return layer
