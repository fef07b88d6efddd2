"""Tests of the stand-in image packaging (images.py) and the Docker Registry v2 stand-in.

The unit tests package a tiny directory as the image layer (no mmdebstrap, no root); the full
image build is covered by ``test_build_vllm_image_for_real`` when GPUFLEET_LAB_BUILD_IMAGE=1.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import os
import shutil
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpufleet_lab import images
from gpufleet_lab.images import ImageInfo, assemble_image, mirror_lines, write_layer
from gpufleet_lab.registry import make_registry_server

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, object]]:
    root = tmp_path_factory.mktemp("rootfs")
    (root / "usr/local/bin").mkdir(parents=True)
    images.install_standin(root)
    (root / "etc/hostname").write_text("x\n")
    (root / "bin").symlink_to("usr/bin")
    (root / "tmp").mkdir(mode=0o1777)
    os.chmod(root / "tmp", 0o1777)
    (root / "usr/bin").mkdir()
    (root / "usr/bin/python3").write_text("#!/bin/sh\n")
    os.link(root / "usr/bin/python3", root / "usr/bin/python3.11")
    blobs_dir = tmp_path_factory.mktemp("cache") / "blobs"
    layer = write_layer(root, blobs_dir)
    return blobs_dir, layer


@pytest.fixture(scope="module")
def image(blobs: tuple[Path, dict[str, object]]) -> ImageInfo:
    blobs_dir, layer = blobs
    return assemble_image(blobs_dir, layer, tag="v0.11.0")


@pytest.fixture(scope="module")
def registry(blobs: tuple[Path, dict[str, object]], image: ImageInfo) -> Iterator[int]:
    blobs_dir, layer = blobs
    latest = assemble_image(blobs_dir, layer, tag="latest")
    official = assemble_image(blobs_dir, layer, repository="busybox", tag="1.36")
    server = make_registry_server("127.0.0.1", 0, [image, latest, official])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def get(port: int, method: str, path: str, headers: dict[str, str] | None = None,
        body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


# --------------------------------------------------------------------------- image format

def test_layer_is_a_gzip_tar_whose_digests_match(image: ImageInfo) -> None:
    layer = image.blob_path(image.layer_digest).read_bytes()
    assert sha(layer) == image.layer_digest and len(layer) == image.layer_size
    raw = gzip.decompress(layer)
    assert sha(raw) == image.diff_id and len(raw) == image.uncompressed_size
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = {m.name: m for m in tar.getmembers()}
    vllm = members["usr/local/bin/vllm"]
    assert vllm.isreg() and vllm.mode & 0o777 == 0o755 and vllm.uid == 0
    assert members["bin"].issym() and members["bin"].linkname == "usr/bin"
    assert members["usr/bin/python3.11"].islnk()
    assert members["tmp"].mode & 0o7777 == 0o1777
    assert all(m.mtime <= images.SOURCE_DATE_EPOCH for m in members.values())
    names = list(members)
    assert names.index("usr") < names.index("usr/local") < names.index("usr/local/bin/vllm")
    assert "etc/gpufleet-lab-standin" in members and "vllm-workspace" in members


def test_layer_is_reproducible(blobs: tuple[Path, dict[str, object]], tmp_path: Path) -> None:
    root = tmp_path / "r"
    (root / "usr/local/bin").mkdir(parents=True)
    images.install_standin(root)
    first = write_layer(root, tmp_path / "b1")
    os.utime(root / "usr/local/bin/vllm")  # a newer mtime is clamped
    assert write_layer(root, tmp_path / "b2") == first


def test_config_and_manifest(image: ImageInfo) -> None:
    config = json.loads(image.blob_path(image.config_digest).read_bytes())
    assert config["architecture"] == "amd64" and config["os"] == "linux"
    assert config["rootfs"] == {"type": "layers", "diff_ids": [image.diff_id]}
    cfg = config["config"]
    assert cfg["Entrypoint"] == ["vllm", "serve"]
    assert cfg["ExposedPorts"] == {"8000/tcp": {}}
    assert any(e.startswith("PATH=") for e in cfg["Env"])
    assert "VLLM_STANDIN_VERSION=0.11.0" in cfg["Env"]
    assert cfg["Labels"]["io.gpufleet.lab.standin"] == "true"
    assert "stand-in" in cfg["Labels"]["org.opencontainers.image.description"].lower()
    manifest_bytes = image.blob_path(image.manifest_digest).read_bytes()
    assert sha(manifest_bytes) == image.manifest_digest
    manifest = json.loads(manifest_bytes)
    assert manifest["schemaVersion"] == 2 and manifest["mediaType"] == MANIFEST_V2
    assert manifest["config"] == {"mediaType": "application/vnd.docker.container.image.v1+json",
                                  "size": image.config_size, "digest": image.config_digest}
    assert manifest["layers"] == [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                                   "size": image.layer_size, "digest": image.layer_digest}]


def test_image_info_round_trips(image: ImageInfo) -> None:
    assert ImageInfo.from_json(image.to_json()) == image
    assert image.reference == "vllm/vllm-openai:v0.11.0"
    assert image.total_size == image.manifest_size + image.config_size + image.layer_size
    with pytest.raises(ValueError):
        image.blob_path("sha256:../../etc/passwd")


@pytest.mark.parametrize(("tag", "version"), [("v0.11.0", "0.11.0"), ("v0.10.1.post1", "0.10.1"),
                                              ("latest", "0.32.0"), ("0.9.2", "0.9.2"),
                                              ("v0.32.0-cu129", "0.32.0")])
def test_version_for_tag(tag: str, version: str) -> None:
    assert images.version_for_tag(tag).startswith(version)


def test_mirror_lines_keep_only_debian_bookworm_suites(tmp_path: Path) -> None:
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "debian.sources").write_text(
        "Types: deb\n# comment\nURIs: http://deb.debian.org/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\nTypes: deb-src\nURIs: http://deb.debian.org/debian\n"
        "Suites: bookworm\nComponents: main\n\nTypes: deb\nURIs: http://x.invalid/debian\n"
        "Suites: bookworm\nComponents: main\nEnabled: no\n")
    (d / "cloud.list").write_text(
        "deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n"
        "deb [arch=amd64] http://mirror.invalid/debian bookworm main contrib\n")
    (d / "off.list.disabled").write_text("deb http://nope.invalid/debian bookworm main\n")
    assert mirror_lines(tmp_path) == [
        "deb http://mirror.invalid/debian bookworm main contrib",
        "deb http://deb.debian.org/debian bookworm main",
        "deb http://deb.debian.org/debian bookworm-updates main",
        "deb http://deb.debian.org/debian-security bookworm-security main",
    ]


# --------------------------------------------------------------------------- registry API

def test_base_endpoint(registry: int) -> None:
    status, headers, body = get(registry, "GET", "/v2/")
    assert status == 200 and json.loads(body) == {}
    assert headers["docker-distribution-api-version"] == "registry/2.0"


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_manifest_by_tag_and_digest(registry: int, image: ImageInfo, method: str) -> None:
    accept = {"Accept": f"{MANIFEST_V2}, application/vnd.docker.distribution.manifest.list.v2+json"}
    for ref in ("v0.11.0", image.manifest_digest):
        status, headers, body = get(registry, method, f"/v2/vllm/vllm-openai/manifests/{ref}",
                                    accept)
        assert status == 200
        assert headers["content-type"] == MANIFEST_V2
        assert headers["docker-content-digest"] == image.manifest_digest
        assert int(headers["content-length"]) == image.manifest_size
        if method == "GET":
            assert sha(body) == image.manifest_digest
        else:
            assert body == b""


def test_other_tags_and_official_image_mirror_paths(registry: int) -> None:
    status, headers, _ = get(registry, "GET", "/v2/vllm/vllm-openai/manifests/latest")
    assert status == 200
    # docker asks a mirror for library/<name> for official images
    for name in ("library/busybox", "busybox"):
        assert get(registry, "HEAD", f"/v2/{name}/manifests/1.36")[0] == 200


def test_unknown_names_and_tags(registry: int) -> None:
    status, headers, body = get(registry, "GET", "/v2/library/ubuntu/manifests/22.04")
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "NAME_UNKNOWN"
    assert headers["content-type"].startswith("application/json")
    status, _, body = get(registry, "GET", "/v2/vllm/vllm-openai/manifests/v0.99.0")
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    status, _, body = get(registry, "GET", "/v2/vllm/vllm-openai/manifests/sha256:" + "0" * 64)
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    status, _, body = get(registry, "GET", "/nothing-here")
    assert status == 404 and "errors" in json.loads(body)


def test_blobs(registry: int, image: ImageInfo) -> None:
    for digest in (image.config_digest, image.layer_digest):
        status, headers, body = get(registry, "GET", f"/v2/vllm/vllm-openai/blobs/{digest}")
        assert status == 200 and sha(body) == digest
        assert headers["docker-content-digest"] == digest
        assert headers["content-type"] == "application/octet-stream"
        status, headers, body = get(registry, "HEAD", f"/v2/vllm/vllm-openai/blobs/{digest}")
        assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    status, _, body = get(registry, "GET", "/v2/vllm/vllm-openai/blobs/sha256:" + "1" * 64)
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "BLOB_UNKNOWN"
    status, _, body = get(registry, "GET", "/v2/vllm/vllm-openai/blobs/md5:abc")
    assert status == 400 and json.loads(body)["errors"][0]["code"] == "DIGEST_INVALID"


def test_blob_range_requests(registry: int, image: ImageInfo) -> None:
    full = image.blob_path(image.layer_digest).read_bytes()
    path = f"/v2/vllm/vllm-openai/blobs/{image.layer_digest}"
    status, headers, body = get(registry, "GET", path, {"Range": "bytes=10-"})
    assert status == 206 and body == full[10:]
    assert headers["content-range"] == f"bytes 10-{len(full) - 1}/{len(full)}"
    status, _, body = get(registry, "GET", path, {"Range": "bytes=0-9"})
    assert status == 206 and body == full[:10]
    assert get(registry, "GET", path, {"Range": f"bytes={len(full) + 5}-"})[0] == 416


def test_read_only(registry: int) -> None:
    for method in ("PUT", "POST", "PATCH", "DELETE"):
        status, _, body = get(registry, method, "/v2/vllm/vllm-openai/blobs/uploads/", body=b"x")
        assert status == 405 and json.loads(body)["errors"][0]["code"] == "UNSUPPORTED"


def test_tags_list_and_catalog(registry: int) -> None:
    status, _, body = get(registry, "GET", "/v2/vllm/vllm-openai/tags/list")
    assert status == 200
    assert json.loads(body) == {"name": "vllm/vllm-openai", "tags": ["v0.11.0", "latest"]}
    status, _, body = get(registry, "GET", "/v2/_catalog")
    assert "vllm/vllm-openai" in json.loads(body)["repositories"]


def test_server_is_not_serving_until_started(image: ImageInfo) -> None:
    server = make_registry_server("127.0.0.1", 0, [image])  # bound, does not block
    try:
        assert server.server_address[1] > 0
    finally:
        server.server_close()


@pytest.mark.lab
@pytest.mark.skipif(os.environ.get("GPUFLEET_LAB_BUILD_IMAGE") != "1" or os.geteuid() != 0
                    or shutil.which("mmdebstrap") is None,
                    reason="set GPUFLEET_LAB_BUILD_IMAGE=1 (root, mmdebstrap, Debian mirror)")
def test_build_vllm_image_for_real(tmp_path: Path) -> None:
    info = images.build_vllm_image(tmp_path / "cache", "v0.11.0")
    assert info.layer_size < 60_000_000
    raw = gzip.decompress(info.blob_path(info.layer_digest).read_bytes())
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        names = set(tar.getnames())
    assert {"usr/local/bin/vllm", "usr/bin/python3", "usr/lib/python3.11/http/server.py"} <= names
    assert not any(n.startswith("usr/share/doc/") for n in names)
    again = images.build_vllm_image(tmp_path / "cache", "v0.11.0")
    assert again == info
