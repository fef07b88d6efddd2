"""The STAND-IN ``vllm/vllm-openai`` docker image for the gpufleet lab.

The real image is ~10 GB of CUDA, PyTorch and vLLM and lives on Docker Hub, which the lab
cannot reach. The stand-in is a minimal Debian bookworm root filesystem (mmdebstrap
``--variant=essential`` plus python3-minimal and libpython3.11-stdlib, docs/man/locales
stripped) with :mod:`gpufleet_lab.vllm_standin` installed as ``/usr/local/bin/vllm``, packaged
as a real Docker image (one gzip layer, an image config with ``Entrypoint ["vllm", "serve"]``
like the real image, and a Docker image manifest v2 schema 2), stored as content-addressed
blobs in the lab cache and served by :mod:`gpufleet_lab.registry`, so lab hosts really
``docker pull vllm/vllm-openai:<tag>`` through their ``registry-mirrors``.

Layout under ``<cache_dir>/vllm-image/``::

    blobs/sha256/<hex>          layer (gzip), config and manifest blobs
    layers/<inputs-key>.json    the layer built for one set of inputs (the build cache)
    images/<tag>.json           the ImageInfo of the last build of that tag
    .lock                       one build at a time (flock)

Building needs root, mmdebstrap and Debian's mirror (the lab machine has all three); the
result is cached by a hash of every input, so later calls take well under a second.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import IO, Any

from gpufleet.model.vllm_version import PINNED_IMAGE, image_tag
from gpufleet_lab import hosts, vllm_standin

VLLM_REPOSITORY = "vllm/vllm-openai"
DEFAULT_TAG: str = image_tag(PINNED_IMAGE)  # type: ignore[assignment]
SUITE = "bookworm"
PACKAGES = ("python3-minimal", "libpython3.11-stdlib")
RECIPE_REV = 1  # bump when the build recipe changes (invalidates cached layers)
# fixed timestamp for every file in the layer and for the config: reproducible digests
SOURCE_DATE_EPOCH = 1759363200  # 2025-10-02T00:00:00Z, around vLLM v0.11.0's release
CREATED = "2025-10-02T00:00:00Z"

MEDIA_MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_CONFIG_V1 = "application/vnd.docker.container.image.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MEDIA_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"  # docker sniffs: plain tar

STANDIN_SOURCE = Path(__file__).with_name("vllm_standin.py")


def standin_flags() -> bytes:
    """vLLM's serve flags as gpufleet has them: the stand-in reads them from beside itself."""
    return resources.files("gpufleet.model").joinpath(vllm_standin.FLAGS_FILE).read_bytes()

STRIP_PATHS = (
    "usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian",
    "usr/share/common-licenses", "usr/lib/x86_64-linux-gnu/gconv", "usr/lib/python3.11/test",
    "usr/lib/python3.11/pydoc_data", "usr/lib/python3.11/ensurepip", "usr/lib/python3.11/idlelib",
    "usr/lib/python3.11/lib2to3", "usr/lib/python3.11/tkinter", "var/cache/apt",
    "var/cache/debconf/templates.dat", "var/cache/debconf/templates.dat-old",
    "var/lib/apt/lists", "var/log",
)
DPKG_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*",
                 "/usr/share/locale/*", "/usr/share/lintian/*")
# directories docker provides at run time: keep them, empty
EMPTY_DIRS = ("dev", "proc", "sys", "run", "tmp", "var/log", "var/cache/apt")

Logger = Callable[[str], None]


@dataclass(frozen=True)
class ImageInfo:
    """One stand-in image, as the registry serves it (all digests are ``sha256:<hex>``)."""

    repository: str
    tag: str
    blobs_dir: Path  # directory holding blobs/sha256/<hex>
    manifest_digest: str
    manifest_size: int
    config_digest: str
    config_size: int
    layer_digest: str  # of the gzip blob
    layer_size: int
    diff_id: str  # of the uncompressed layer tar
    uncompressed_size: int
    version: str  # what `vllm --version` and /version report

    @property
    def reference(self) -> str:
        return f"{self.repository}:{self.tag}"

    @property
    def total_size(self) -> int:
        """Bytes a `docker pull` transfers (manifest + config + layer)."""
        return self.manifest_size + self.config_size + self.layer_size

    def blob_path(self, digest: str) -> Path:
        algo, _, hexdigest = digest.partition(":")
        if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", hexdigest):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self.blobs_dir / "sha256" / hexdigest

    def to_json(self) -> str:
        data = asdict(self)
        data["blobs_dir"] = str(self.blobs_dir)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ImageInfo:
        data = json.loads(text)
        data["blobs_dir"] = Path(data["blobs_dir"])
        return cls(**data)


# --------------------------------------------------------------------------- helpers

def mirror_lines(etc_apt: Path = Path("/etc/apt")) -> list[str]:
    """The bookworm ``deb`` lines apt on this machine uses (same reader as the host images)."""
    return hosts.apt_mirrors(etc_apt)


class _HashWriter:
    """File-like sink that hashes and counts what goes through it, then passes it on."""

    def __init__(self, sink: IO[bytes] | Any) -> None:
        self.sink = sink
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        self.sink.write(data)
        return len(data)

    def flush(self) -> None:
        self.sink.flush()

    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()


def _store_blob(blobs_dir: Path, data: bytes) -> tuple[str, int]:
    hexdigest = hashlib.sha256(data).hexdigest()
    path = blobs_dir / "sha256" / hexdigest
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{hexdigest}.{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return "sha256:" + hexdigest, len(data)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- layer

def write_layer(rootfs: Path, blobs_dir: Path, compresslevel: int = 6) -> dict[str, Any]:
    """Tar ``rootfs`` (deterministically) into a gzip layer blob; return its digests/sizes."""
    blobs = blobs_dir / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    tmp = blobs / f".layer.{os.getpid()}.tmp"
    with open(tmp, "wb") as out:
        compressed = _HashWriter(out)
        with gzip.GzipFile(filename="", mode="wb", fileobj=compressed,  # type: ignore[arg-type]
                           mtime=0, compresslevel=compresslevel) as gz:
            raw = _HashWriter(gz)
            tar_stream = tarfile.open(fileobj=raw, mode="w|",  # type: ignore[call-overload]
                                      format=tarfile.PAX_FORMAT)
            with tar_stream as tar:
                for rel in _walk(rootfs):
                    info = tar.gettarinfo(str(rootfs / rel), arcname=rel)
                    if info is None:  # sockets: not representable in tar
                        continue
                    info.mtime = min(int(info.mtime), SOURCE_DATE_EPOCH)
                    info.uname = info.gname = ""
                    if info.isreg():
                        with open(rootfs / rel, "rb") as fh:
                            tar.addfile(info, fh)
                    else:
                        tar.addfile(info)
    digest = compressed.digest()
    os.replace(tmp, blobs / digest.split(":", 1)[1])
    return {"layer_digest": digest, "layer_size": compressed.size,
            "diff_id": raw.digest(), "uncompressed_size": raw.size}


def uncompressed_layer(layer: dict[str, Any], blobs_dir: Path) -> dict[str, Any]:
    """The same layer as a plain tar blob (its digest is the diff id), unpacked once from the
    gzip blob: a pull then skips the single-threaded gunzip, which on this 2-core machine is
    the largest part of pulling the real vLLM image."""
    blob = blobs_dir / "sha256" / layer["diff_id"].split(":", 1)[1]
    if not blob.is_file():
        tmp = blob.with_name(f".tar.{os.getpid()}.tmp")
        digest = hashlib.sha256()
        with gzip.open(blobs_dir / "sha256" / layer["layer_digest"].split(":", 1)[1]) as src, \
                open(tmp, "wb") as out:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if f"sha256:{digest.hexdigest()}" != layer["diff_id"]:
            tmp.unlink()
            raise ValueError(f"the layer unpacks to sha256:{digest.hexdigest()}, not its diff id "
                             f"{layer['diff_id']}")
        os.replace(tmp, blob)
    return {**layer, "layer_digest": layer["diff_id"], "layer_size": layer["uncompressed_size"],
            "media_type": MEDIA_LAYER_TAR}


def _walk(root: Path, rel: str = "") -> Iterator[str]:
    """Relative paths below root in tar order (each directory followed by its entries),
    sorted, not following symlinks."""
    for name in sorted(os.listdir(root / rel if rel else root)):
        child = f"{rel}/{name}" if rel else name
        yield child
        path = root / child
        if path.is_dir() and not path.is_symlink():
            yield from _walk(root, child)


# --------------------------------------------------------------------------- image

def image_config(diff_id: str, version: str, tag: str) -> dict[str, Any]:
    """The image config (``application/vnd.docker.container.image.v1+json``)."""
    return {
        "architecture": "amd64",
        "os": "linux",
        "created": CREATED,
        "author": "gpufleet lab",
        "config": {
            "Env": [
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG=C.UTF-8",
                "PYTHONUNBUFFERED=1",
                "VLLM_USAGE_SOURCE=production-docker-image",
                f"VLLM_STANDIN_VERSION={version}",
            ],
            "Entrypoint": ["vllm", "serve"],
            "Cmd": None,
            "WorkingDir": "/vllm-workspace",
            "ExposedPorts": {"8000/tcp": {}},
            "Labels": {
                "org.opencontainers.image.title": "vllm-openai (gpufleet lab stand-in)",
                "org.opencontainers.image.description":
                    "gpufleet lab STAND-IN for vllm/vllm-openai: Debian bookworm + python3 "
                    "running lab/src/gpufleet_lab/vllm_standin.py. Not vLLM; no GPU code, no weights.",
                "org.opencontainers.image.version": version,
                "io.gpufleet.lab.standin": "true",
                "io.gpufleet.lab.standin-for": f"{VLLM_REPOSITORY}:{tag}",
            },
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{
            "created": CREATED,
            "created_by": "gpufleet lab: mmdebstrap --variant=essential bookworm "
                          f"+{','.join(PACKAGES)} + /usr/local/bin/vllm (vllm_standin.py)",
            "comment": "gpufleet lab stand-in image",
        }],
    }


def assemble_image(blobs_dir: Path, layer: dict[str, Any], *, repository: str = VLLM_REPOSITORY,
                   tag: str = DEFAULT_TAG, version: str | None = None,
                   config: dict[str, Any] | None = None) -> ImageInfo:
    """Write the config (``config``, else the stand-in's) and manifest blobs for an existing
    layer blob; return the ImageInfo."""
    version = version or version_for_tag(tag)
    config_digest, config_size = _store_blob(
        blobs_dir, _canonical(config or image_config(layer["diff_id"], version, tag)))
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST_V2,
        "config": {"mediaType": MEDIA_CONFIG_V1, "size": config_size, "digest": config_digest},
        "layers": [{"mediaType": layer.get("media_type", MEDIA_LAYER_GZIP),
                    "size": layer["layer_size"], "digest": layer["layer_digest"]}],
    }
    manifest_bytes = json.dumps(manifest, indent=3).encode()  # like docker/distribution
    manifest_digest, manifest_size = _store_blob(blobs_dir, manifest_bytes)
    return ImageInfo(repository=repository, tag=tag, blobs_dir=blobs_dir,
                     manifest_digest=manifest_digest, manifest_size=manifest_size,
                     config_digest=config_digest, config_size=config_size,
                     layer_digest=layer["layer_digest"], layer_size=layer["layer_size"],
                     diff_id=layer["diff_id"], uncompressed_size=layer["uncompressed_size"],
                     version=version)


def version_for_tag(tag: str) -> str:
    """``v0.32.0`` and the CUDA 12.9 build's ``v0.32.0-cu129`` -> ``0.32.0``; tags that are not
    versions (``latest``) report the pinned one."""
    m = re.fullmatch(r"v?(\d+\.\d+\.\d+(?:\.post\d+|rc\d+)?)(?:-[\w.]+)?", tag)
    return m.group(1) if m else DEFAULT_TAG.lstrip("v")


def inputs_key(mirrors: Sequence[str]) -> str:
    h = hashlib.sha256()
    h.update(f"rev={RECIPE_REV}\nsuite={SUITE}\npackages={','.join(PACKAGES)}\n".encode())
    h.update(("strip=" + ",".join(STRIP_PATHS) + "\n").encode())
    h.update(("mirrors=" + "|".join(mirrors) + "\n").encode())
    h.update(STANDIN_SOURCE.read_bytes())
    h.update(standin_flags())
    return h.hexdigest()[:16]


def build_rootfs(dest: Path, mirrors: Sequence[str], log: Logger = print) -> None:
    """mmdebstrap the stand-in rootfs into ``dest`` (must not exist) and install the stand-in."""
    if os.geteuid() != 0:
        raise PermissionError("building the stand-in vLLM image needs root (mmdebstrap)")
    if shutil.which("mmdebstrap") is None:
        raise FileNotFoundError("mmdebstrap not found: apt-get install mmdebstrap")
    cmd = ["mmdebstrap", "--quiet", "--variant=essential", "--include=" + ",".join(PACKAGES)]
    merged = Path("/usr/share/mmdebstrap/hooks/merged-usr")
    if merged.is_dir():  # merged /usr without the usrmerge package (which pulls in perl)
        cmd.append(f"--hook-dir={merged}")
    cmd += [f"--dpkgopt=path-exclude={p}" for p in DPKG_EXCLUDES]
    cmd += [SUITE, str(dest), *mirrors]
    log(f"[images] {' '.join(cmd)}")
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(SOURCE_DATE_EPOCH))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"mmdebstrap failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    for rel in STRIP_PATHS:
        p = dest / rel
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    for rel in EMPTY_DIRS:
        p = dest / rel
        if p.is_dir() and not p.is_symlink():
            for child in p.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        p.mkdir(mode=0o1777 if rel == "tmp" else 0o755, parents=True, exist_ok=True)
    os.chmod(dest / "tmp", 0o1777)
    install_standin(dest)


def install_standin(rootfs: Path) -> None:
    """Put vllm_standin.py in as /usr/local/bin/vllm (so ``vllm serve ...`` works)."""
    target = rootfs / "usr/local/bin/vllm"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(STANDIN_SOURCE, target)
    os.chmod(target, 0o755)
    flags = target.with_name(vllm_standin.FLAGS_FILE)
    flags.write_bytes(standin_flags())
    os.chmod(flags, 0o644)
    (rootfs / "vllm-workspace").mkdir(mode=0o755, exist_ok=True)
    marker = rootfs / "etc/gpufleet-lab-standin"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("This root filesystem is the gpufleet lab STAND-IN for vllm/vllm-openai.\n"
                      "/usr/local/bin/vllm is lab/src/gpufleet_lab/vllm_standin.py, not vLLM.\n")


def build_vllm_image(cache_dir: Path, tag: str = DEFAULT_TAG, *,
                     repository: str = VLLM_REPOSITORY, mirrors: Sequence[str] | None = None,
                     log: Logger = print) -> ImageInfo:
    """Build (or reuse from ``cache_dir``) the stand-in vLLM image for ``repository:tag``.

    The layer is cached by a hash of its inputs (recipe, packages, mirror lines,
    vllm_standin.py and the flag file); only the small config/manifest blobs depend on the tag.
    """
    base = Path(cache_dir) / "vllm-image"
    blobs_dir = base / "blobs"
    mirrors = list(mirror_lines() if mirrors is None else mirrors)
    if not mirrors:
        raise RuntimeError("no bookworm 'deb' source found in /etc/apt/sources.list*")
    key = inputs_key(mirrors)
    layer_file = base / "layers" / f"{key}.json"
    with hosts.file_lock(base / ".lock"):
        layer: dict[str, Any] | None = None
        if layer_file.is_file():
            layer = json.loads(layer_file.read_text())
            if not (blobs_dir / "sha256" / layer["layer_digest"].split(":")[1]).is_file():
                layer = None
        if layer is None:
            t0 = time.monotonic()
            work = base / f"build.{os.getpid()}"
            if work.exists():
                shutil.rmtree(work)
            work.mkdir(parents=True)
            try:
                rootfs = work / "rootfs"
                build_rootfs(rootfs, mirrors, log)
                t1 = time.monotonic()
                layer = write_layer(rootfs, blobs_dir)
                log(f"[images] rootfs {t1 - t0:.1f}s, layer {time.monotonic() - t1:.1f}s: "
                    f"{layer['uncompressed_size'] / 1e6:.1f} MB tar, "
                    f"{layer['layer_size'] / 1e6:.1f} MB gzip")
            finally:
                shutil.rmtree(work, ignore_errors=True)
            layer_file.parent.mkdir(parents=True, exist_ok=True)
            layer_file.write_text(json.dumps(layer, indent=2, sort_keys=True) + "\n")
        info = assemble_image(blobs_dir, layer, repository=repository, tag=tag)
        index = base / "images" / f"{repository.replace('/', '_')}_{tag}.json"
        index.parent.mkdir(parents=True, exist_ok=True)
        index.write_text(info.to_json())
    return info
