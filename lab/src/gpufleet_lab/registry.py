"""STAND-IN for Docker Hub: a read-only Docker Registry HTTP API v2 for the gpufleet lab.

Serves the stand-in images built by :mod:`gpufleet_lab.images` (content-addressed blobs on
disk) with the parts of the Registry v2 protocol that ``docker pull`` uses, so that lab hosts
pull ``vllm/vllm-openai:<tag>`` for real, through ``/etc/docker/daemon.json``::

    "registry-mirrors": ["http://<bridge>:8702"], "insecure-registries": ["<bridge>:8702"]

A pull-through mirror is asked for the same repository path Docker Hub would be asked for:
``library/<name>`` for official images (``ubuntu`` -> ``library/ubuntu``) and the plain
``<namespace>/<name>`` otherwise (``vllm/vllm-openai``); the stand-in answers for both
spellings of a repository name, and also when addressed directly as
``<bridge>:8702/vllm/vllm-openai:<tag>``.

Endpoints (anything else: 404 with a registry error body, writes: 405 UNSUPPORTED):
  GET  /v2/                                 200 ``{}``, Docker-Distribution-API-Version
  GET  /v2/_catalog                         repositories
  GET  /v2/<name>/tags/list                 tags
  GET|HEAD /v2/<name>/manifests/<tag|digest> manifest v2 schema 2, Docker-Content-Digest
  GET|HEAD /v2/<name>/blobs/<digest>        config and layer blobs (Range supported)
"""

from __future__ import annotations

import json
import re
import sys
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

from gpufleet_lab.httpserve import serve_until_interrupted
from gpufleet_lab.images import MEDIA_MANIFEST_V2, ImageInfo

API_VERSION_HEADER = ("Docker-Distribution-API-Version", "registry/2.0")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[\w][\w.-]{0,127}")
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
PATH_RE = re.compile(r"^/v2/(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<ref>[^/]+)$")
TAGS_RE = re.compile(r"^/v2/(?P<name>.+)/tags/list$")


def name_aliases(repository: str) -> list[str]:
    """The repository names a pull-through mirror can be asked for, for one image name."""
    names = [repository]
    if repository.startswith("library/"):
        names.append(repository.removeprefix("library/"))
    elif "/" not in repository:
        names.append("library/" + repository)
    for prefix in ("docker.io/", "index.docker.io/", "registry-1.docker.io/"):
        if repository.startswith(prefix):
            names.append(repository.removeprefix(prefix))
    return names


class RegistryContent:
    """Index of what the registry serves: manifests by (name, tag|digest), blobs by name."""

    def __init__(self, images: Iterable[ImageInfo]) -> None:
        self.manifests: dict[tuple[str, str], tuple[bytes, str]] = {}
        self.blobs: dict[tuple[str, str], Path] = {}
        self.tags: dict[str, list[str]] = {}
        for image in images:
            data = image.blob_path(image.manifest_digest).read_bytes()
            for name in name_aliases(image.repository):
                self.manifests[(name, image.tag)] = (data, image.manifest_digest)
                self.manifests[(name, image.manifest_digest)] = (data, image.manifest_digest)
                for digest in (image.config_digest, image.layer_digest):
                    self.blobs[(name, digest)] = image.blob_path(digest)
                tags = self.tags.setdefault(name, [])
                if image.tag not in tags:
                    tags.append(image.tag)

    def repositories(self) -> list[str]:
        return sorted(self.tags)


def _error(code: str, message: str, detail: Any = None) -> dict[str, Any]:
    return {"errors": [{"code": code, "message": message, "detail": detail}]}


class RegistryServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], content: RegistryContent,
                 log: IO[str] | None = None) -> None:
        self.content = content
        self.access_log = log
        self.log_lock = threading.Lock()
        super().__init__(address, RegistryHandler)


class RegistryHandler(BaseHTTPRequestHandler):
    server_version = "gpufleet-lab-registry-standin/1.0"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    server: RegistryServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        log = self.server.access_log
        if log is not None:
            with self.server.log_lock:
                log.write(f"[registry] {self.address_string()} {format % args}\n")
                log.flush()

    # ---- responses
    def _headers(self, status: int, length: int, ctype: str,
                 extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header(*API_VERSION_HEADER)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(length))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()

    def _json(self, status: int, obj: Any, extra: dict[str, str] | None = None) -> None:
        body = (json.dumps(obj) + "\n").encode()
        self._headers(status, len(body), "application/json; charset=utf-8", extra)
        if self.command != "HEAD":
            self.wfile.write(body)

    def _drain(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > 0:
            self.rfile.read(length)

    # ---- methods
    def do_GET(self) -> None:  # noqa: N802
        self._route()

    def do_HEAD(self) -> None:  # noqa: N802
        self._route()

    def _unsupported(self) -> None:
        self._drain()
        self._json(405, _error("UNSUPPORTED", "The operation is unsupported.",
                               "read-only gpufleet lab registry stand-in"))

    def do_POST(self) -> None:  # noqa: N802
        self._unsupported()

    def do_PUT(self) -> None:  # noqa: N802
        self._unsupported()

    def do_PATCH(self) -> None:  # noqa: N802
        self._unsupported()

    def do_DELETE(self) -> None:  # noqa: N802
        self._unsupported()

    def _route(self) -> None:
        path = self.path.split("?", 1)[0]
        content = self.server.content
        if path in ("/v2", "/v2/"):
            self._json(200, {})
            return
        if path == "/v2/_catalog":
            self._json(200, {"repositories": content.repositories()})
            return
        m = TAGS_RE.match(path)
        if m:
            name = m.group("name")
            if name not in content.tags:
                self._json(404, _error("NAME_UNKNOWN", "repository name not known to registry",
                                       {"name": name}))
            else:
                self._json(200, {"name": name, "tags": content.tags[name]})
            return
        m = PATH_RE.match(path)
        if not m:
            self._json(404, _error("NOT_FOUND", "404 page not found"))
            return
        name, kind, ref = m.group("name"), m.group("kind"), m.group("ref")
        if not NAME_RE.fullmatch(name):
            self._json(400, _error("NAME_INVALID", "invalid repository name", {"name": name}))
            return
        if name not in content.tags:
            self._json(404, _error("NAME_UNKNOWN", "repository name not known to registry",
                                   {"name": name}))
            return
        if kind == "manifests":
            self._manifest(name, ref)
        else:
            self._blob(name, ref)

    def _manifest(self, name: str, ref: str) -> None:
        if not (DIGEST_RE.fullmatch(ref) or TAG_RE.fullmatch(ref)):
            self._json(400, _error("TAG_INVALID", "manifest tag did not match URI",
                                   {"tag": ref}))
            return
        found = self.server.content.manifests.get((name, ref))
        if found is None:
            self._json(404, _error("MANIFEST_UNKNOWN", "manifest unknown",
                                   {"Name": name, "Revision" if ":" in ref else "Tag": ref}))
            return
        data, digest = found
        self._headers(200, len(data), MEDIA_MANIFEST_V2,
                      {"Docker-Content-Digest": digest, "Etag": f'"{digest}"'})
        if self.command != "HEAD":
            self.wfile.write(data)

    def _blob(self, name: str, digest: str) -> None:
        if not DIGEST_RE.fullmatch(digest):
            self._json(400, _error("DIGEST_INVALID",
                                   "provided digest did not match uploaded content",
                                   {"digest": digest}))
            return
        path = self.server.content.blobs.get((name, digest))
        if path is None or not path.is_file():
            self._json(404, _error("BLOB_UNKNOWN", "blob unknown to registry",
                                   {"digest": digest}))
            return
        size = path.stat().st_size
        start, end = 0, size - 1
        status = 200
        extra = {"Docker-Content-Digest": digest, "Etag": f'"{digest}"',
                 "Accept-Ranges": "bytes", "Cache-Control": "max-age=31536000"}
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if m and (m.group(1) or m.group(2)):
                if m.group(1):
                    start = int(m.group(1))
                    end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                else:
                    start = max(0, size - int(m.group(2)))
                if start > end or start >= size:
                    self._json(416, _error("BLOB_UNKNOWN", "requested range not satisfiable"),
                               {"Content-Range": f"bytes */{size}"})
                    return
                status = 206
                extra["Content-Range"] = f"bytes {start}-{end}/{size}"
        self._headers(status, end - start + 1, "application/octet-stream", extra)
        if self.command == "HEAD":
            return
        with open(path, "rb") as fh:
            fh.seek(start)
            remaining = end - start + 1
            try:
                while remaining > 0:
                    chunk = fh.read(min(1 << 20, remaining))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    remaining -= len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass


def make_registry_server(bind_host: str, port: int, images: Iterable[ImageInfo], *,
                         log: IO[str] | None = None) -> ThreadingHTTPServer:
    """A bound (not yet serving) registry server; run ``serve_forever()`` in a thread.

    ``images``: the ImageInfo of every repository:tag to serve (e.g. one from
    ``build_vllm_image(cache, "v0.32.0")`` and one for ``"latest"``). ``log``: a text stream
    for access-log lines (None: silent).
    """
    return RegistryServer((bind_host, port), RegistryContent(images), log=log)


def main(argv: list[str] | None = None) -> int:
    """``python -m gpufleet_lab.registry HOST PORT CACHE_DIR [TAG...]``: serve in foreground."""
    from gpufleet_lab.images import DEFAULT_TAG, build_vllm_image

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3:
        sys.stderr.write(main.__doc__ or "")
        return 2
    host, port, cache = args[0], int(args[1]), Path(args[2])
    tags = args[3:] or [DEFAULT_TAG]
    images = [build_vllm_image(cache, tag) for tag in tags]
    server = make_registry_server(host, port, images, log=sys.stderr)
    print(f"registry stand-in on http://{host}:{server.server_address[1]} serving "
          + ", ".join(i.reference for i in images), flush=True)
    return serve_until_interrupted(server)


if __name__ == "__main__":
    sys.exit(main())
