#!/usr/bin/env python3
"""Stage a Hugging Face model on this host at a pinned commit, in the Hugging Face cache layout
(installed and run by gpufleet before the vLLM service (re)starts).

    stage_weights.py --manifest M.json --endpoint URL [--token-file F] --models-dir /opt/models

The manifest (written by the controller from the Hub's metadata) names the model, the commit, the
revision it came from and every file with its size (and sha256 for LFS files). Files land in
``<models-dir>/hub/models--org--name/blobs/<etag>`` with ``snapshots/<commit>/<path>`` symlinks
and ``refs/<revision>``, exactly where huggingface_hub (and so vLLM with HF_HUB_OFFLINE=1)
looks. The free disk space is checked first; a download interrupted half-way resumes from its
partial file with an HTTP Range request; sha256 is verified; a completion marker is written
last, so a later run knows without listing files.

One staging per model at a time: a ``flock`` on ``<repo>/.gpufleet/stage.lock`` (which holds the
holder's pid). A second stager of the same model waits for it, says so, then resumes from what
the first one left (or finds the completion marker and stops).

The staging stops with the run that started it. pyinfra's SSH connector closes the command's
stdin right after exec and allocates no pty, so when the controller dies the command gets no
EOF and no SIGHUP; only sshd's per-connection process exits. So the nearest ancestor whose name
is ``sshd`` or ``sshd-session`` is watched (every second, pid and start time) and when it is gone
the stager exits (code 75): the lock is released, the partial file is kept for the next run.
No such ancestor (pyinfra's @local) means no watch; ``--watch-pid`` names the process to watch
instead, ``--no-watch-parent`` turns the watch off. A write to a closed stdout/stderr also means
the run is gone.

Errors that cannot heal are not retried: a full disk or quota (ENOSPC, EDQUOT) stops at once with
the space needed and free; HTTP 401/403/404 stop at once. Cut connections, timeouts and server
errors resume with backoff.

With ``--peer-file`` (root-only JSON ``{"url", "token"}``, removed once read) each file is asked
first of a peer that has the model staged (``weights_peer.py`` on its private address), verified
against the manifest like a download from the Hub (sha256, or the git blob id of a small file);
whatever the peer cannot give comes from the Hub.

The token file (``--token-file``, root-only 0600) holds the Hugging Face token either as a
``HF_TOKEN=value`` line (quotes allowed) or as the raw token alone; missing file or no token:
anonymous. The token is never read from the command line. Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import http.client
import json
import os
import shutil
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator

CHUNK = 1 << 20
ATTEMPTS = 6  # per file, for errors that heal (a cut connection resumes from what arrived)
EXIT_RUN_GONE = 75  # EX_TEMPFAIL: the run that started this staging is gone; the next resumes
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
SSHD_NAMES = ("sshd", "sshd-session")
WATCH_INTERVAL_S = 1.0
TOKEN_KEYS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


# --------------------------------------------------------------------------------------------
# Output: a closed pipe means the run is gone
# --------------------------------------------------------------------------------------------


def say(message: str, err: bool = True) -> None:
    stream = sys.stderr if err else sys.stdout
    try:
        print(message, file=stream, flush=True)
    except (BrokenPipeError, ValueError):  # the controller's end of the channel is closed
        os._exit(EXIT_RUN_GONE)


def fmt_size(n: float) -> str:
    """A size in the unit that fits: ``512 B``, ``5.2 MiB``, ``812.0 MiB``, ``15.0 GiB``."""
    n = max(0, int(n))
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def disk_space_message(models_dir: str, model: str, commit: str, need: int, free: int,
                       during: str | None = None) -> str:
    what = f"while writing {during}" if during else "before the download"
    return (f"not enough disk space in {models_dir} ({what}): {model}@{commit[:12]} needs "
            f"{fmt_size(need)} more, {fmt_size(free)} free. Free space or point models_dir at a "
            "larger disk (DigitalOcean GPU droplets have a scratch disk), then re-run: what "
            "arrived is kept and resumed")


# --------------------------------------------------------------------------------------------
# The token
# --------------------------------------------------------------------------------------------


def read_token(token_file: str | None) -> str | None:
    """The token from ``HF_TOKEN=value`` (or ``HUGGING_FACE_HUB_TOKEN=``) or from a file that
    holds only the token; None when the file is missing or holds none."""
    if not token_file:
        return None
    try:
        with open(token_file, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    except OSError:
        return None
    for line in lines:
        key, sep, value = line.partition("=")
        if sep and key.strip() in TOKEN_KEYS:
            return value.strip().strip("'\"") or None
    if len(lines) == 1 and "=" not in lines[0]:
        return lines[0]
    return None


def read_peer(peer_file: str | None) -> dict | None:
    """The peer to ask first (``{"url", "token"}``), read once and the file removed: its token
    is good for this run only. None without a file or with a bad one (the Hub serves)."""
    if not peer_file:
        return None
    try:
        with open(peer_file, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(peer_file)
    if isinstance(doc, dict) and isinstance(doc.get("url"), str) and doc.get("token"):
        return {"url": doc["url"], "token": str(doc["token"])}
    return None


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------


def repo_dir(models_dir: str, model: str) -> str:
    return os.path.join(models_dir, "hub", "models--" + model.replace("/", "--"))


def marker_path(models_dir: str, model: str, commit: str) -> str:
    return os.path.join(repo_dir(models_dir, model), ".gpufleet", f"{commit}.complete")


def lock_path(models_dir: str, model: str) -> str:
    return os.path.join(repo_dir(models_dir, model), ".gpufleet", "stage.lock")


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


# --------------------------------------------------------------------------------------------
# One staging per model at a time
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def staging_lock(models_dir: str, model: str) -> Iterator[None]:
    """Hold the model's staging lock; wait (and say so) while another stager holds it. The lock
    file stays (removing it would let a third stager lock a file nobody else sees)."""
    path = lock_path(models_dir, model)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            say(f"waiting for another staging of {model} (pid {holder}) to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


# --------------------------------------------------------------------------------------------
# Stop with the run that started us
# --------------------------------------------------------------------------------------------


def proc_stat(pid: int) -> tuple[str, str, int, int] | None:
    """(comm, state, ppid, start time) of a process from /proc/PID/stat; None if gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            raw = f.read()
    except OSError:
        return None
    comm = raw[raw.find("(") + 1:raw.rfind(")")]
    rest = raw[raw.rfind(")") + 2:].split()
    try:
        return comm, rest[0], int(rest[1]), int(rest[19])
    except (IndexError, ValueError):
        return None


def session_ancestor(pid: int | None = None) -> tuple[int, int] | None:
    """(pid, start time) of the nearest ancestor named sshd / sshd-session: the SSH connection
    that runs this command. None when there is none (a local run)."""
    current = os.getpid() if pid is None else pid
    seen: set[int] = set()
    while current > 1 and current not in seen:
        seen.add(current)
        st = proc_stat(current)
        if st is None:
            return None
        comm, _, ppid, start = st
        if current != pid and comm in SSHD_NAMES:
            return current, start
        current = ppid
    return None


def alive(pid: int, start: int | None) -> bool:
    st = proc_stat(pid)
    return st is not None and st[1] not in ("Z", "X") and (start is None or st[3] == start)


def watch(pid: int, start: int | None, what: str, interval: float = WATCH_INTERVAL_S,
          on_gone: Callable[[], None] | None = None) -> threading.Thread:
    """A daemon thread that ends this process when ``pid`` (with that start time) is gone."""

    def run() -> None:
        while alive(pid, start):
            time.sleep(interval)
        try:
            sys.stderr.write(f"{what} (pid {pid}) is gone: stopping the staging; what arrived is "
                             "kept and the next run resumes it\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        if on_gone is not None:
            on_gone()
        else:
            os._exit(EXIT_RUN_GONE)

    thread = threading.Thread(target=run, name="gpufleet-watch-parent", daemon=True)
    thread.start()
    return thread


# --------------------------------------------------------------------------------------------
# Downloads
# --------------------------------------------------------------------------------------------


def download(url: str, token: str | None, dest: str, size: int) -> tuple[int, str]:
    """Download url into dest (resuming a partial dest); return (bytes fetched, etag)."""
    have = _size(dest)
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
        # unbuffered, and read1: what arrived is on disk, so a stop loses next to nothing
        with open(dest, mode, buffering=0) as out:
            while True:
                block = resp.read1(CHUNK)
                if not block:
                    break
                view = memoryview(block)
                while view:
                    view = view[out.write(view):]
                fetched += len(block)
    return fetched, etag


def _link(snapshot: str, path: str, blob: str) -> None:
    link = os.path.join(snapshot, path)
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)


def _no_space(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in NO_SPACE


def stage(manifest: dict, endpoint: str, token: str | None, models_dir: str,
          sleep: Callable[[float], None] = time.sleep, peer: dict | None = None) -> int:
    model, commit = manifest["model"], manifest["commit"]
    if os.path.isfile(marker_path(models_dir, model, commit)):
        say(f"{model}@{commit[:12]} is staged already", err=False)
        return 0
    try:
        with staging_lock(models_dir, model):
            if os.path.isfile(marker_path(models_dir, model, commit)):
                say(f"{model}@{commit[:12]} was staged meanwhile by another run", err=False)
                return 0
            return _stage(manifest, endpoint, token, models_dir, sleep, peer)
    except OSError as e:
        if not _no_space(e):
            raise
        say(disk_space_message(models_dir, model, commit, 0, shutil.disk_usage(models_dir).free,
                               getattr(e, "filename", None)))
        return 1


class StageError(Exception):
    """Staging stops: the message says why and what to do."""


class NoSpace(StageError):
    """The disk is full: no source can help."""


class Repo:
    """Where one model's files go in the Hugging Face cache layout, at one commit."""

    def __init__(self, models_dir: str, model: str, commit: str) -> None:
        self.models_dir, self.model, self.commit = models_dir, model, commit
        self.root = repo_dir(models_dir, model)
        self.blobs = os.path.join(self.root, "blobs")
        self.partial = os.path.join(self.root, ".gpufleet", "partial")
        self.snapshot = os.path.join(self.root, "snapshots", commit)
        for d in (self.blobs, self.partial, self.snapshot, os.path.join(self.root, "refs")):
            os.makedirs(d, exist_ok=True)

    def part_of(self, f: dict) -> str:
        key = hashlib.sha1(f"{self.commit}/{f['path']}".encode()).hexdigest()
        return os.path.join(self.partial, key)

    def blob_of(self, f: dict) -> str | None:
        known = f.get("sha256") or f.get("blob_id")
        return os.path.join(self.blobs, known) if known else None

    def has_blob(self, f: dict) -> bool:
        blob = self.blob_of(f)
        return bool(blob) and os.path.isfile(blob or "") and _size(blob or "") == f["size"]

    def missing(self, f: dict) -> int:
        """Bytes still to download for ``f`` (a partial file counts)."""
        return 0 if self.has_blob(f) else max(0, f["size"] - _size(self.part_of(f)))

    def no_space(self, f: dict, rest: list[dict]) -> StageError:
        left = self.missing(f) + sum(self.missing(g) for g in rest)
        return NoSpace(disk_space_message(self.models_dir, self.model, self.commit, left,
                                             shutil.disk_usage(self.models_dir).free, f["path"]))


def _download_with_resume(repo: Repo, f: dict, url: str, token: str | None, rest: list[dict],
                          sleep: Callable[[float], None],
                          attempts: int = ATTEMPTS) -> tuple[int, str]:
    """Download ``f`` into its partial file, resuming a cut connection (Range) up to
    ``attempts`` times; a full disk or an access error stops at once. Returns (bytes fetched,
    etag)."""
    part, known = repo.part_of(f), f.get("sha256") or f.get("blob_id")
    fetched_total, etag = 0, ""
    for attempt in range(attempts):
        if _size(part) == f["size"] and (etag or known):
            break  # complete already (a stopped run got every byte)
        try:
            fetched, etag = download(url, token, part, f["size"])
            fetched_total += fetched
        except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException) as e:
            if _no_space(e):
                raise repo.no_space(f, rest) from None
            if isinstance(e, urllib.error.HTTPError) and e.code in (401, 403, 404):
                raise StageError(f"{url}: HTTP {e.code} {e.reason}") from None
            if isinstance(e, urllib.error.HTTPError) and e.code == 416:
                etag = etag or (known or "")
            elif attempt + 1 < attempts:
                say(f"{f['path']}: {e}; resuming from {fmt_size(_size(part))} "
                    f"(attempt {attempt + 2} of {attempts})")
        if _size(part) >= f["size"]:
            break
        if attempt + 1 < attempts:
            sleep(min(2 * (attempt + 1), 10))
    if _size(part) != f["size"]:
        raise StageError(f"{f['path']}: got {fmt_size(_size(part))} of {fmt_size(f['size'])} "
                         f"after {attempts} attempts; re-run to resume")
    return fetched_total, etag


def git_blob_id(path: str) -> str:
    """The git blob id of a file (what the Hub's metadata gives for a file not in LFS)."""
    h = hashlib.sha1(f"blob {_size(path)}\0".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _from_peer(repo: Repo, f: dict, peer: dict, rest: list[dict],
               sleep: Callable[[float], None]) -> int | None:
    """``f`` from a peer into its partial file, verified against the manifest (sha256, or the
    git blob id of a small file); bytes fetched, or None (then the Hub is asked for what is
    missing). A full disk is not the peer's fault: it stops the staging."""
    blob = f.get("sha256") or f.get("blob_id")
    if not blob:
        return None
    url = f"{peer['url'].rstrip('/')}/blobs/{blob}"
    try:
        fetched, _ = _download_with_resume(repo, f, url, peer["token"], rest, sleep, attempts=2)
    except NoSpace:
        raise
    except StageError as e:
        say(f"{f['path']}: peer {peer['url']}: {e}; asking the Hub")
        return None
    part = repo.part_of(f)
    got = sha256_of(part) if f.get("sha256") else git_blob_id(part)
    if got != blob:
        os.unlink(part)
        say(f"{f['path']}: peer {peer['url']} sent bytes that do not match the manifest; "
            "asking the Hub")
        return None
    return fetched


def _stage_file(repo: Repo, f: dict, endpoint: str, token: str | None, rest: list[dict],
                sleep: Callable[[float], None], peer: dict | None = None) -> tuple[int, int]:
    """One file into its blob (sha256-verified) and its snapshot link, from the peer when one
    is given and has it, else from the Hub; returns (bytes from the Hub, bytes from the peer)."""
    if repo.has_blob(f):
        _link(repo.snapshot, f["path"], repo.blob_of(f) or "")  # there from another revision
        return 0, 0
    from_peer = _from_peer(repo, f, peer, rest, sleep) if peer else None
    if from_peer is not None:
        blob = repo.blob_of(f) or ""
        os.replace(repo.part_of(f), blob)
        _link(repo.snapshot, f["path"], blob)
        return 0, from_peer
    quoted = urllib.parse.quote(f["path"])
    url = f"{endpoint.rstrip('/')}/{repo.model}/resolve/{repo.commit}/{quoted}"
    fetched, etag = _download_with_resume(repo, f, url, token, rest, sleep)
    part = repo.part_of(f)
    if f.get("sha256"):
        digest = sha256_of(part)
        if digest != f["sha256"]:
            os.unlink(part)
            raise StageError(f"{f['path']}: sha256 {digest} does not match the Hub's "
                             f"{f['sha256']}")
        etag = digest
    known = f.get("sha256") or f.get("blob_id")
    blob = os.path.join(repo.blobs,
                        etag or known or hashlib.sha256(f["path"].encode()).hexdigest())
    os.replace(part, blob)
    _link(repo.snapshot, f["path"], blob)
    return fetched, 0


def _mark_complete(repo: Repo, manifest: dict) -> None:
    """The revision's ref, then the completion marker (last: later runs trust it)."""
    revision = manifest.get("revision") or repo.commit
    if revision != repo.commit:
        with open(os.path.join(repo.root, "refs", revision.replace("/", "%2F")), "w") as out:
            out.write(repo.commit)
    marker = marker_path(repo.models_dir, repo.model, repo.commit)
    with open(marker + ".tmp", "w") as out:
        json.dump({"model": repo.model, "commit": repo.commit, "files": len(manifest["files"]),
                   "bytes": sum(f["size"] for f in manifest["files"]),
                   "staged_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, out)
    os.replace(marker + ".tmp", marker)


def _stage(manifest: dict, endpoint: str, token: str | None, models_dir: str,
           sleep: Callable[[float], None], peer: dict | None = None) -> int:
    model, commit = manifest["model"], manifest["commit"]
    repo = Repo(models_dir, model, commit)
    todo = [f for f in manifest["files"]
            if not os.path.exists(os.path.join(repo.snapshot, f["path"]))]
    need = sum(repo.missing(f) for f in todo)
    free = shutil.disk_usage(models_dir).free
    if need and free < need * 1.05 + (1 << 30) * (need > (1 << 30)):
        say(disk_space_message(models_dir, model, commit, need, free))
        return 1
    fetched_total, from_peers, t0 = 0, 0, time.monotonic()
    try:
        for i, f in enumerate(todo):
            hub_bytes, peer_bytes = _stage_file(repo, f, endpoint, token, todo[i + 1:], sleep,
                                                peer)
            fetched_total += hub_bytes
            from_peers += peer_bytes
    except StageError as e:
        say(str(e))
        return 1
    _mark_complete(repo, manifest)
    peer_part = (f", {fmt_size(from_peers)} ({from_peers} bytes) from peer {peer['url']}"
                 if peer else "")
    say(f"staged {model}@{commit[:12]}: downloaded {fmt_size(fetched_total)} "
        f"({fetched_total} bytes) from the Hub{peer_part}; {len(manifest['files'])} files, "
        f"{len(todo)} not in this snapshot yet, in {time.monotonic() - t0:.1f}s", err=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", required=True)
    p.add_argument("--endpoint", required=True)
    p.add_argument("--token-file", help="root-only file holding the Hugging Face token")
    p.add_argument("--models-dir", required=True)
    p.add_argument("--peer-file",
                   help="root-only JSON file {url, token}: a peer serving its staged blobs "
                        "(weights_peer.py), asked before the Hub; removed once read")
    p.add_argument("--watch-pid", type=int,
                   help="stop when this process is gone (default: the nearest sshd ancestor)")
    p.add_argument("--no-watch-parent", action="store_true",
                   help="do not stop when the run that started this staging is gone")
    a = p.parse_args(argv)
    if not a.no_watch_parent:
        if a.watch_pid:
            st = proc_stat(a.watch_pid)
            if st is None:
                say(f"process {a.watch_pid} to watch does not exist: not staging")
                return EXIT_RUN_GONE
            watch(a.watch_pid, st[3], f"process {a.watch_pid}")
        else:
            found = session_ancestor()
            if found is not None:
                watch(found[0], found[1], "the SSH session of the run that started this staging")
    with open(a.manifest, encoding="utf-8") as f:
        manifest = json.load(f)
    return stage(manifest, a.endpoint, read_token(a.token_file), a.models_dir,
                 peer=read_peer(a.peer_file))


if __name__ == "__main__":
    sys.exit(main())
