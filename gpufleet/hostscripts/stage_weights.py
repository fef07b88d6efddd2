#!/usr/bin/env python3
"""Stage a Hugging Face model on this host at a pinned commit, in the Hugging Face cache layout
(installed and run by gpufleet before the vLLM service (re)starts).

    stage_weights.py --manifest M.json --endpoint URL --env-file F --models-dir /opt/models

The manifest (written by the controller from the Hub's metadata) names the model, the commit, the
revision it came from and every file with its size (and sha256 for LFS files). Files land in
``<models-dir>/hub/models--org--name/blobs/<etag>`` with ``snapshots/<commit>/<path>`` symlinks
and ``refs/<revision>``, exactly where huggingface_hub (and so vLLM with HF_HUB_OFFLINE=1)
looks. The free disk space is checked first; a download interrupted half-way resumes from its
``.incomplete`` file with an HTTP Range request; sha256 is verified; a completion marker is
written last, so a later run knows without listing files. The token is read from the root-only
env file, never from the command line. Standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

CHUNK = 1 << 20


def read_token(env_file: str) -> str | None:
    try:
        with open(env_file, encoding="utf-8") as f:
            for line in f:
                if line.startswith("HF_TOKEN="):
                    return line.split("=", 1)[1].strip().strip("'\"") or None
    except OSError:
        return None
    return None


def repo_dir(models_dir: str, model: str) -> str:
    return os.path.join(models_dir, "hub", "models--" + model.replace("/", "--"))


def marker_path(models_dir: str, model: str, commit: str) -> str:
    return os.path.join(repo_dir(models_dir, model), ".gpufleet", f"{commit}.complete")


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def download(url: str, token: str | None, dest: str, size: int) -> tuple[int, str]:
    """Download url into dest (resuming a partial dest); return (bytes fetched, etag)."""
    have = os.path.getsize(dest) if os.path.exists(dest) else 0
    if have > size:
        os.unlink(dest)
        have = 0
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if have:
        req.add_header("Range", f"bytes={have}-")
    fetched = 0
    with urllib.request.urlopen(req, timeout=60) as resp:
        etag = (resp.headers.get("X-Linked-Etag") or resp.headers.get("ETag") or "").strip('"')
        etag = etag.removeprefix("W/").strip('"')
        mode = "ab" if have and resp.status == 206 else "wb"
        with open(dest, mode) as out:
            while True:
                block = resp.read(CHUNK)
                if not block:
                    break
                out.write(block)
                fetched += len(block)
    return fetched, etag


def _link(snapshot: str, path: str, blob: str) -> None:
    link = os.path.join(snapshot, path)
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)


def stage(manifest: dict, endpoint: str, token: str | None, models_dir: str) -> int:
    model, commit = manifest["model"], manifest["commit"]
    root = repo_dir(models_dir, model)
    blobs, partial = os.path.join(root, "blobs"), os.path.join(root, ".gpufleet", "partial")
    snapshot = os.path.join(root, "snapshots", commit)
    for d in (blobs, partial, snapshot, os.path.join(root, "refs")):
        os.makedirs(d, exist_ok=True)

    todo = [f for f in manifest["files"]
            if not os.path.exists(os.path.join(snapshot, f["path"]))]
    need = sum(f["size"] for f in todo)
    free = shutil.disk_usage(models_dir).free
    if need and free < need * 1.05 + (1 << 30) * (need > (1 << 30)):
        print(f"not enough disk space in {models_dir}: {model}@{commit[:12]} needs "
              f"{need / 2**30:.1f} GiB more, {free / 2**30:.1f} GiB free. Free space or point "
              "models_dir at a larger disk (DigitalOcean GPU droplets have a scratch disk).",
              file=sys.stderr)
        return 1

    fetched_total, t0 = 0, time.monotonic()
    for f in todo:
        known = f.get("sha256") or f.get("blob_id")
        blob = os.path.join(blobs, known) if known else None
        if blob and os.path.isfile(blob) and os.path.getsize(blob) == f["size"]:
            _link(snapshot, f["path"], blob)  # the same content is there from another revision
            continue
        quoted = urllib.parse.quote(f["path"])
        url = f"{endpoint.rstrip('/')}/{model}/resolve/{commit}/{quoted}"
        part = os.path.join(partial, hashlib.sha1(f"{commit}/{f['path']}".encode()).hexdigest())
        etag = ""
        for attempt in range(6):  # a cut connection resumes from what arrived (Range)
            try:
                fetched, etag = download(url, token, part, f["size"])
                fetched_total += fetched
            except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException) as e:
                if isinstance(e, urllib.error.HTTPError) and e.code in (401, 403, 404):
                    print(f"{url}: HTTP {e.code} {e.reason}", file=sys.stderr)
                    return 1
                print(f"{f['path']}: {e}; resuming", file=sys.stderr)
            if os.path.exists(part) and os.path.getsize(part) >= f["size"]:
                break
            time.sleep(min(2 * attempt, 10))
        if os.path.getsize(part) != f["size"]:
            print(f"{f['path']}: got {os.path.getsize(part)} bytes, expected {f['size']}; "
                  "re-run to resume", file=sys.stderr)
            return 1
        if f.get("sha256"):
            digest = sha256_of(part)
            if digest != f["sha256"]:
                os.unlink(part)
                print(f"{f['path']}: sha256 {digest} does not match the Hub's {f['sha256']}",
                      file=sys.stderr)
                return 1
            etag = digest
        blob = os.path.join(blobs, etag or known or hashlib.sha256(f["path"].encode()).hexdigest())
        os.replace(part, blob)
        _link(snapshot, f["path"], blob)

    revision = manifest.get("revision") or commit
    if revision != commit:
        with open(os.path.join(root, "refs", revision.replace("/", "%2F")), "w") as out:
            out.write(commit)
    marker = marker_path(models_dir, model, commit)
    with open(marker + ".tmp", "w") as out:
        json.dump({"model": model, "commit": commit, "files": len(manifest["files"]),
                   "bytes": sum(f["size"] for f in manifest["files"]),
                   "staged_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, out)
    os.replace(marker + ".tmp", marker)
    print(f"staged {model}@{commit[:12]}: downloaded {fetched_total} bytes "
          f"({len(manifest['files'])} files, {len(todo)} not in this snapshot yet) in "
          f"{time.monotonic() - t0:.1f}s")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", required=True)
    p.add_argument("--endpoint", required=True)
    p.add_argument("--env-file", required=True)
    p.add_argument("--models-dir", required=True)
    a = p.parse_args()
    with open(a.manifest, encoding="utf-8") as f:
        manifest = json.load(f)
    return stage(manifest, a.endpoint, read_token(a.env_file), a.models_dir)


if __name__ == "__main__":
    sys.exit(main())
