"""Lab stand-in: an emulator of the Hugging Face Hub endpoints gpufleet uses (TEST INFRASTRUCTURE).

This is NOT the Hugging Face Hub. It is a small stdlib HTTP server that answers the few endpoints
that ``huggingface_hub`` (``HfApi.model_info``, ``list_repo_refs``, ``list_repo_tree``,
``auth_check``, ``whoami``, ``hf_hub_download``, ``snapshot_download``,
``get_safetensors_metadata``) and gpufleet's host-side weight staging call, with the status
codes, ``X-Error-Code`` / ``X-Error-Message`` headers and JSON shapes of the Hub, so that the real
client runs unchanged against it (``HF_ENDPOINT=http://<addr>:<port>``). It serves two
repositories built by ``gpufleet_lab.tinymodel`` (same files, same commits):

* ``gpufleet-lab/tiny-llama``        public
* ``gpufleet-lab/tiny-llama-gated``  gated ("manual" approval)

and, in a lab (``lab_repos(engine)``, the one place that says what a lab serves),
``meta-llama/Meta-Llama-3-8B-Instruct`` (gated) too: for the stand-in engine with Llama 3 8B's
real config.json and parameter count over the tiny weights (real plans), for the real vLLM with
the tiny model's own files (the engine loads them).

Revisions: branches ``main`` (``tinymodel.COMMIT_MAIN``) and ``next`` (``COMMIT_NEXT``), tag
``v1.0`` (= main), or any full 40-hex commit id of the two.

Tokens (``HubTokens``; ``Authorization: Bearer <token>``):

* ``good``            user ``lab-user``, accepted the gated repo's licence: access granted
* ``no_access``       user ``lab-stranger``, valid, never requested access to the gated repo
* ``pending``         user ``lab-pending``, requested access, not yet approved
* ``no_gated_scope``  user ``lab-user`` again, but a fine-grained token without "Read access to
  contents of all public gated repos you can access"
* anything else       invalid: 401 ``Invalid credentials in Authorization header`` on EVERY
  endpoint, public repositories included (the Hub does this since 2025)

Endpoints:

* ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``: model info (``_id``,
  ``id``, ``sha``, ``gated``, ``private``, ``siblings`` [+ ``size``, ``blobId``, ``lfs``
  {``sha256``, ``size``, ``pointerSize``} with ``?blobs=true``], ``safetensors`` {``parameters``,
  ``total``}, ``config``, ``cardData``...; ``?expand=`` keeps ``_id``, ``id`` and the listed
  keys). Readable without a token for the gated repo too, as on the Hub: only the files are gated.
* ``GET /api/models/{repo}/refs[?include_prs=1]``, ``GET /api/models/{repo}/tree/{rev}[/{path}]``
* ``GET /api/models/{repo}/auth-check``: 200, or the gated errors below
* ``GET /api/whoami-v2``
* ``HEAD|GET /{repo}/resolve/{rev}/{path}``: the file, served directly (200, no CDN redirect)
  with ``X-Repo-Commit``, ``ETag`` (quoted: the sha256 for an LFS file, the git blob id
  otherwise), ``X-Linked-Etag`` / ``X-Linked-Size`` for LFS files, ``Content-Length``,
  ``Accept-Ranges: bytes``; ``Range: bytes=N-``, ``bytes=N-M`` and ``bytes=-S`` answer 206 with
  ``Content-Range`` (416 when unsatisfiable), so interrupted downloads resume.

Errors, as the Hub answers them:

* gated repo file without a token: 401 ``X-Error-Code: GatedRepo``, "Access to model X is
  restricted. You must have access to it and be authenticated to access it. Please log in."
* gated repo file with a token without access: 403 ``GatedRepo``, "Access to model X is restricted
  and you are not in the authorized list. Visit https://huggingface.co/X to ask for access."
  (pending request: "Your request to access model X is awaiting a review from the repo
  authors."; fine-grained token without the gated-repos permission: "Please enable access to
  public gated repositories in your fine-grained token settings to view this repository.")
* unknown repository: ``X-Error-Code: RepoNotFound`` "Repository not found", 401 without a
  token, 404 with a valid one; unknown revision: 404 ``RevisionNotFound`` "Invalid rev id: R";
  unknown file: 404 ``EntryNotFound`` "Entry not found" (with ``X-Repo-Commit``).

Lab knobs (no token; never counted):

* ``GET /_lab/stats``: bytes of file content served (total, per repo, per client IP, per file),
  requests (total, per kind, per client) and downloads (started, completed, cut).
  ``POST /_lab/stats/reset`` zeroes them. ``GET /_lab/requests``: the last requests
  (method, path, status, client, token role, range, bytes), never the token itself.
* ``POST /_lab/faults {"cut_after_bytes": N, "count": K, "path": "*.safetensors", "repo": R}``:
  the next K file downloads (GET bodies longer than N bytes, optionally only of matching
  paths/repo) drop the connection after N bytes. ``{"throttle_bytes_per_second": B}`` slows
  every file body down (0 = off). ``GET /_lab/faults`` shows them, ``DELETE /_lab/faults``
  clears them.

Not emulated: CDN redirects for LFS files (bytes are served by the resolve URL itself), Xet
storage, private repositories, uploads, pagination (trees are tiny), rate limits.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import hashlib
import json
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from gpufleet_lab import tinymodel
from gpufleet_lab.httpserve import base_url
from gpufleet_lab.tinymodel import RepoFile, Revision

REPO_PUBLIC = "gpufleet-lab/tiny-llama"
REPO_GATED = "gpufleet-lab/tiny-llama-gated"
HUB_PORT = 8703  # suggested lab port (apt 8701, registry 8702)
HUB_WEB = "https://huggingface.co"  # the site the Hub's own messages point to

# Lab tokens: the Hub's format (hf_ + 34 letters/digits), obviously fake.
GOOD_TOKEN = "hf_gpufleetLabGoodTokenAAAAAAAAAAAAA"
NO_ACCESS_TOKEN = "hf_gpufleetLabNoAccessTokenBBBBBBBBB"
PENDING_TOKEN = "hf_gpufleetLabPendingTokenCCCCCCCCCC"
NO_GATED_SCOPE_TOKEN = "hf_gpufleetLabFineGrainedTokenDDDDDD"

INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
REPO_NOT_FOUND = "Repository not found"
ENTRY_NOT_FOUND = "Entry not found"
FINE_GRAINED_NO_GATED = (
    "Please enable access to public gated repositories in your fine-grained token settings to "
    "view this repository."
)
LOG_SIZE = 2000
CHUNK = 64 * 1024
MAX_BODY = 1024 * 1024


def gated_anonymous_message(repo: str) -> str:
    return (f"Access to model {repo} is restricted. You must have access to it and be "
            "authenticated to access it. Please log in.")


def gated_forbidden_message(repo: str, web: str = HUB_WEB) -> str:
    return (f"Access to model {repo} is restricted and you are not in the authorized list. "
            f"Visit {web}/{repo} to ask for access.")


def gated_pending_message(repo: str) -> str:
    return f"Your request to access model {repo} is awaiting a review from the repo authors."


def revision_not_found_message(revision: str) -> str:
    return f"Invalid rev id: {revision}"


# --------------------------------------------------------------------------------------------
# Tokens and repositories
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenInfo:
    role: str                 # "good", "no_access", "pending", "no_gated_scope"
    user: str
    gated_access: str         # "granted", "none", "pending"
    fine_grained: bool = False
    can_read_gated: bool = True


@dataclass(frozen=True)
class HubTokens:
    """The tokens the emulator knows; any other bearer token is invalid. ``None`` disables one."""

    good: str = GOOD_TOKEN
    no_access: str | None = NO_ACCESS_TOKEN
    pending: str | None = PENDING_TOKEN
    no_gated_scope: str | None = NO_GATED_SCOPE_TOKEN

    def lookup(self, token: str) -> TokenInfo | None:
        if not token:
            return None
        if token == self.good:
            return TokenInfo("good", "lab-user", "granted")
        if token == self.no_access:
            return TokenInfo("no_access", "lab-stranger", "none")
        if token == self.pending:
            return TokenInfo("pending", "lab-pending", "pending")
        if token == self.no_gated_scope:
            return TokenInfo("no_gated_scope", "lab-user", "granted", fine_grained=True,
                             can_read_gated=False)
        return None


@dataclass(frozen=True)
class HubRepo:
    repo_id: str
    gated: str | bool = False  # False, "auto" or "manual", as the Hub reports it
    # A stand-in of a real model: its real config.json and parameter count (so the planner sees
    # the real shape) over the tiny model's weights (so staging moves a few MB, not 16 GB).
    config_override: Mapping[str, Any] | None = None
    parameters_override: Mapping[str, int] | None = None

    @property
    def object_id(self) -> str:
        """The Hub's 24-hex ``_id`` (a MongoDB ObjectId there; a fixed hash here)."""
        return hashlib.sha1(self.repo_id.encode()).hexdigest()[:24]


DEFAULT_REPOS: tuple[HubRepo, ...] = (HubRepo(REPO_PUBLIC), HubRepo(REPO_GATED, "manual"))

# meta-llama/Meta-Llama-3-8B-Instruct's config.json (the fields that matter) and parameter count
LLAMA3_8B_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "max_position_embeddings": 8192, "rope_theta": 500000.0,
    "rms_norm_eps": 1e-05, "vocab_size": 128256, "torch_dtype": "bfloat16",
    "bos_token_id": 128000, "eos_token_id": 128009, "tie_word_embeddings": False,
}
REPO_LLAMA3_8B = "meta-llama/Meta-Llama-3-8B-Instruct"
LLAMA3_8B = HubRepo(REPO_LLAMA3_8B, "manual", config_override=LLAMA3_8B_CONFIG,
                    parameters_override={"BF16": 8_030_261_248})

# What a lab serves, by the engine its hosts run. Same repo ids in both. "standin": the Llama 3
# id has Llama 3 8B's real config.json and parameter count over the tiny weights, so plans are
# Llama 3 8B's; only the stand-in engine can "load" that (the real vLLM would read the 8B
# config.json and fail on the tiny weights). "real": the Llama 3 id serves the tiny model's own,
# consistent files, which the real vLLM loads; plans for it are the tiny model's.
ENGINES = ("standin", "real")
LAB_REPOS: Mapping[str, tuple[HubRepo, ...]] = {
    "standin": (*DEFAULT_REPOS, LLAMA3_8B),
    "real": (*DEFAULT_REPOS, HubRepo(REPO_LLAMA3_8B, "manual")),
}


def lab_repos(engine: str = "standin") -> dict[str, HubRepo]:
    """repo id -> HubRepo of a lab whose hosts run ``engine`` ("standin" or "real"), as
    ``HubState(repos=...)`` takes them."""
    if engine not in LAB_REPOS:
        raise ValueError(f"unknown lab engine {engine!r}: use one of {', '.join(ENGINES)}")
    return {r.repo_id: r for r in LAB_REPOS[engine]}


def safetensors_parameters(content: bytes) -> dict[str, int]:
    """dtype -> parameter count, read from a safetensors file's header."""
    (length,) = struct.unpack("<Q", content[:8])
    header = json.loads(content[8:8 + length])
    counts: dict[str, int] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        n = 1
        for dim in info["shape"]:
            n *= dim
        counts[info["dtype"]] = counts.get(info["dtype"], 0) + n
    return counts


# --------------------------------------------------------------------------------------------
# State: repositories, counters, faults
# --------------------------------------------------------------------------------------------


@dataclass
class Fault:
    cut_after_bytes: int
    count: int
    path: str | None = None
    repo: str | None = None

    def matches(self, repo: str, path: str, body_len: int) -> bool:
        return (body_len > self.cut_after_bytes
                and (self.path is None or fnmatch.fnmatchcase(path, self.path))
                and (self.repo is None or self.repo == repo))

    def to_json(self) -> dict[str, Any]:
        return {"cut_after_bytes": self.cut_after_bytes, "count": self.count, "path": self.path,
                "repo": self.repo}


def _zero_stats() -> dict[str, Any]:
    return {
        "total_bytes": 0,
        "bytes_by_repo": {},
        "bytes_by_client": {},
        "bytes_by_file": {},
        "requests": 0,
        "requests_by_kind": {},
        "requests_by_client": {},
        "downloads": {"started": 0, "completed": 0, "cut": 0},
    }


@dataclass
class HubState:
    """Everything the servers of one emulator share (several listening addresses, one state)."""

    tokens: HubTokens = field(default_factory=HubTokens)
    repos: Mapping[str, HubRepo] = field(
        default_factory=lambda: {r.repo_id: r for r in DEFAULT_REPOS})
    hub_web: str = HUB_WEB
    api_safetensors: bool = True  # False: model info without "safetensors" (client must parse)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.stats: dict[str, Any] = _zero_stats()
        self.log: deque[dict[str, Any]] = deque(maxlen=LOG_SIZE)
        self.faults: list[Fault] = []
        self.throttle_bps = 0
        self.revisions: dict[str, Revision] = tinymodel.commits()
        self.branches = dict(tinymodel.BRANCHES)
        self.tags = dict(tinymodel.TAGS)
        self._parameters: dict[str, dict[str, int]] = {}
        blobs = {f.etag: f.size for rev in self.revisions.values() for f in rev.files.values()}
        self.used_storage = sum(blobs.values())

    # -- lookups ----------------------------------------------------------------------------

    def resolve(self, revision: str, repo: HubRepo | None = None) -> Revision | None:
        commit = self.branches.get(revision) or self.tags.get(revision) or revision
        rev = self.revisions.get(commit)
        if rev is None or repo is None or repo.config_override is None:
            return rev
        config = tinymodel.RepoFile("config.json",
                                    (json.dumps(repo.config_override, indent=2) + "\n").encode())
        return dataclasses.replace(rev, files={**rev.files, "config.json": config})

    def parameters(self, rev: Revision) -> dict[str, int]:
        with self.lock:
            if rev.commit not in self._parameters:
                counts: dict[str, int] = {}
                for f in rev.files.values():
                    if f.path.endswith(".safetensors"):
                        for dtype, n in safetensors_parameters(f.content).items():
                            counts[dtype] = counts.get(dtype, 0) + n
                self._parameters[rev.commit] = counts
            return self._parameters[rev.commit]

    # -- counters ---------------------------------------------------------------------------

    def count_request(self, kind: str, client: str) -> None:
        with self.lock:
            s = self.stats
            s["requests"] += 1
            s["requests_by_kind"][kind] = s["requests_by_kind"].get(kind, 0) + 1
            s["requests_by_client"][client] = s["requests_by_client"].get(client, 0) + 1

    def count_bytes(self, repo: str, path: str, client: str, n: int) -> None:
        with self.lock:
            s = self.stats
            s["total_bytes"] += n
            for key, name in (("bytes_by_repo", repo), ("bytes_by_client", client),
                              ("bytes_by_file", f"{repo}/{path}")):
                s[key][name] = s[key].get(name, 0) + n

    def count_download(self, what: str) -> None:
        with self.lock:
            self.stats["downloads"][what] += 1

    def record(self, entry: dict[str, Any]) -> None:
        with self.lock:
            self.log.append(entry)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return json.loads(json.dumps(self.stats))

    def requests(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.log)

    def reset(self) -> None:
        with self.lock:
            self.stats = _zero_stats()
            self.log.clear()

    # -- faults -----------------------------------------------------------------------------

    def add_fault(self, fault: Fault) -> None:
        with self.lock:
            self.faults.append(fault)

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()
            self.throttle_bps = 0

    def take_cut(self, repo: str, path: str, body_len: int) -> int | None:
        """If a pending fault applies to this download, consume one and return where to cut."""
        with self.lock:
            for fault in self.faults:
                if fault.count > 0 and fault.matches(repo, path, body_len):
                    fault.count -= 1
                    cut = fault.cut_after_bytes
                    self.faults = [f for f in self.faults if f.count > 0]
                    return cut
            return None

    def faults_json(self) -> dict[str, Any]:
        with self.lock:
            return {"faults": [f.to_json() for f in self.faults],
                    "throttle_bytes_per_second": self.throttle_bps}


# --------------------------------------------------------------------------------------------
# JSON documents
# --------------------------------------------------------------------------------------------


def sibling_json(f: RepoFile, blobs: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"rfilename": f.path}
    if blobs:
        entry["blobId"] = f.blob_id
        entry["size"] = f.size
        if f.pointer is not None:
            entry["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": len(f.pointer)}
    return entry


def model_info_json(state: HubState, repo: HubRepo, rev: Revision, *, blobs: bool = False,
                    expand: Sequence[str] | None = None) -> dict[str, Any]:
    org = repo.repo_id.split("/")[0]
    tok = tinymodel.tokenizer_config()
    data: dict[str, Any] = {
        "_id": repo.object_id,
        "id": repo.repo_id,
        "private": False,
        "pipeline_tag": "text-generation",
        "library_name": "transformers",
        "tags": ["transformers", "safetensors", "llama", "text-generation", "gpufleet-lab",
                 "tiny", "license:apache-2.0", "text-generation-inference", "region:us"],
        "downloads": 0,
        "likes": 0,
        "modelId": repo.repo_id,
        "author": org,
        "sha": rev.commit,
        "lastModified": rev.last_modified,
        "createdAt": tinymodel.CREATED_AT,
        "gated": repo.gated,
        "disabled": False,
        "config": {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "tokenizer_config": {k: tok[k] for k in ("bos_token", "eos_token", "unk_token",
                                                     "pad_token", "chat_template")},
        },
        "cardData": dict(tinymodel.CARD_DATA),
        "transformersInfo": {"auto_model": "AutoModelForCausalLM",
                             "pipeline_tag": "text-generation", "processor": "AutoTokenizer"},
        "siblings": [sibling_json(f, blobs) for f in rev.files.values()],
        "spaces": [],
        "usedStorage": state.used_storage,
    }
    if state.api_safetensors:
        params = dict(repo.parameters_override or state.parameters(rev))
        if params:
            data["safetensors"] = {"parameters": params, "total": sum(params.values())}
    if expand:
        data = {k: v for k, v in data.items() if k in ("_id", "id") or k in expand}
    return data


def refs_json(state: HubState, include_prs: bool) -> dict[str, Any]:
    data: dict[str, Any] = {
        "branches": [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": c}
                     for n, c in state.branches.items()],
        "converts": [],
        "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": c}
                 for n, c in state.tags.items()],
    }
    if include_prs:
        data["pullRequests"] = []
    return data


def tree_json(rev: Revision, path: str, recursive: bool) -> list[dict[str, Any]] | None:
    """Entries under ``path`` ("" = root); None when ``path`` is not a directory."""
    prefix = path.strip("/") + "/" if path.strip("/") else ""
    entries: dict[str, dict[str, Any]] = {}
    for f in rev.files.values():
        if not f.path.startswith(prefix):
            continue
        rest = f.path[len(prefix):]
        parts = rest.split("/")
        for depth in range(1, len(parts)):  # directories on the way
            if depth > 1 and not recursive:
                break
            d = prefix + "/".join(parts[:depth])
            oid = hashlib.sha1(d.encode()).hexdigest()
            entries.setdefault(d, {"type": "directory", "oid": oid, "size": 0, "path": d})
        if len(parts) == 1 or recursive:
            entry: dict[str, Any] = {"type": "file", "oid": f.blob_id, "size": f.size,
                                     "path": f.path}
            if f.pointer is not None:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": len(f.pointer)}
            entries[f.path] = entry
    if prefix and not entries:
        return None
    return [entries[k] for k in sorted(entries)]


def whoami_json(info: TokenInfo) -> dict[str, Any]:
    access: dict[str, Any] = {"displayName": f"gpufleet-lab-{info.role}",
                              "role": "fineGrained" if info.fine_grained else "read",
                              "createdAt": tinymodel.CREATED_AT}
    if info.fine_grained:
        access["fineGrained"] = {"canReadGatedRepos": info.can_read_gated,
                                 "global": ["discussion.write", "post.write"], "scoped": []}
    return {
        "type": "user",
        "id": hashlib.sha1(info.user.encode()).hexdigest()[:24],
        "name": info.user,
        "fullname": f"gpufleet {info.user}",
        "email": f"{info.user}@gpufleet.invalid",
        "emailVerified": True,
        "canPay": False,
        "isPro": False,
        "periodEnd": None,
        "avatarUrl": "",
        "orgs": [],
        "auth": {"type": "access_token", "accessToken": access},
    }


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})


_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None | str:
    """``Range`` -> (start, end inclusive); None: whole file; "unsatisfiable": answer 416."""
    if not header:
        return None
    m = _RANGE.match(header)
    if not m or (not m.group(1) and not m.group(2)):
        return None  # multiple or malformed ranges: ignored, the whole file is sent (RFC 9110)
    first, last = m.group(1), m.group(2)
    if not first:  # suffix: the last S bytes
        suffix = int(last)
        if suffix == 0:
            return "unsatisfiable"
        return max(0, size - suffix), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        return "unsatisfiable"
    return start, end


def _header_safe(value: str) -> str:
    return value.encode("latin-1", "backslashreplace").decode("latin-1")


class HubServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    state: HubState
    _serve_thread: threading.Thread | None = None

    def __init__(self, address: tuple[str, int], state: HubState) -> None:
        self.state = state
        self._connections: set[socket.socket] = set()
        self._conn_lock = threading.Lock()
        super().__init__(address, _Handler)

    def track(self, conn: socket.socket, alive: bool) -> None:
        with self._conn_lock:
            (self._connections.add if alive else self._connections.discard)(conn)

    def start_background(self) -> threading.Thread:
        """Serve in a daemon thread; pair with ``close()``."""
        thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                  name="hub-emulator", daemon=True)
        thread.start()
        self._serve_thread = thread
        return thread

    def close(self) -> None:
        """Stop serving, drop the kept-alive client connections, free the port."""
        thread = self._serve_thread
        if thread is not None:
            self.shutdown()
            thread.join(10)
            self._serve_thread = None
        with self._conn_lock:
            conns = list(self._connections)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.server_close()

    def __enter__(self) -> HubServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Handler(BaseHTTPRequestHandler):
    server: HubServer
    server_version = "gpufleet-hub-emulator/1"
    protocol_version = "HTTP/1.1"
    timeout = 120  # idle kept-alive connections are dropped after this

    # -- plumbing ---------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        if os.environ.get("GPUFLEET_HUB_EMULATOR_VERBOSE"):
            super().log_message(format, *args)

    @property
    def state(self) -> HubState:
        return self.server.state

    @property
    def client(self) -> str:
        return str(self.client_address[0])

    def _send_json(self, status: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
        payload = (json.dumps(body) + "\n").encode() if body is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        for key, value in (headers or {}).items():
            self.send_header(key, _header_safe(value))
        self.end_headers()
        if payload and self.command != "HEAD":
            self.wfile.write(payload)
        self._status = status

    def _send_error(self, err: HubError) -> None:
        headers = {"X-Error-Message": err.message, **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._send_json(err.status, {"error": err.message}, headers)

    def _read_body(self) -> None:
        """Read any request body first, so that an early error answer leaves the kept-alive
        connection in sync; a body too large for a lab knob closes the connection instead."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if length > MAX_BODY:
            self.close_connection = True
            self._raw_body = b""
        else:
            self._raw_body = self.rfile.read(length) if length > 0 else b""

    def _body(self) -> dict[str, Any]:
        raw = self._raw_body
        if not raw:
            return {}
        try:
            data = json.loads(raw)
        except ValueError:
            raise HubError(400, "The request body is not valid JSON.") from None
        if not isinstance(data, dict):
            raise HubError(400, "The request body must be a JSON object.")
        return data

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._dispatch()

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch()

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch()

    def _dispatch(self) -> None:
        self._status = 0
        self._role: str | None = None
        self._served = 0
        self._kind = "other"
        self._read_body()
        split = urlsplit(self.path)
        raw_path = split.path
        query = parse_qs(split.query)
        try:
            if raw_path.startswith("/_lab/"):
                self._lab(raw_path, query)
                return
            self._hub(raw_path, query)
        except HubError as err:
            self._send_error(err)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            if not raw_path.startswith("/_lab/"):
                self.state.record({
                    "time": time.time(), "method": self.command, "path": raw_path,
                    "query": split.query, "status": self._status, "client": self.client,
                    "kind": self._kind, "token": self._role,
                    "range": self.headers.get("Range"), "bytes": self._served,
                })

    # -- lab knobs --------------------------------------------------------------------------

    def _lab(self, path: str, query: dict[str, list[str]]) -> None:
        state = self.state
        if path == "/_lab/stats" and self.command == "GET":
            self._send_json(200, state.snapshot())
        elif path == "/_lab/stats/reset" and self.command == "POST":
            state.reset()
            self._send_json(200, state.snapshot())
        elif path == "/_lab/requests" and self.command == "GET":
            self._send_json(200, {"requests": state.requests()})
        elif path == "/_lab/faults" and self.command == "GET":
            self._send_json(200, state.faults_json())
        elif path == "/_lab/faults" and self.command == "DELETE":
            state.clear_faults()
            self._send_json(200, state.faults_json())
        elif path == "/_lab/faults" and self.command == "POST":
            body = self._body()
            try:
                if "throttle_bytes_per_second" in body:
                    with state.lock:
                        state.throttle_bps = max(0, int(body["throttle_bytes_per_second"] or 0))
                if "cut_after_bytes" in body:
                    state.add_fault(Fault(
                        cut_after_bytes=max(0, int(body["cut_after_bytes"])),
                        count=max(0, int(body.get("count", 1))),
                        path=body.get("path"), repo=body.get("repo")))
            except (TypeError, ValueError):
                raise HubError(400, "cut_after_bytes, count and throttle_bytes_per_second are "
                                    "integers") from None
            self._send_json(200, state.faults_json())
        else:
            raise HubError(404, f"no lab endpoint {self.command} {path}")

    # -- the Hub ----------------------------------------------------------------------------

    def _token(self) -> TokenInfo | None:
        """The caller's token (None: anonymous); an unknown one is rejected right away."""
        header = self.headers.get("Authorization")
        if header is None:
            self._role = "anonymous"
            return None
        scheme, _, token = header.partition(" ")
        info = self.state.tokens.lookup(token.strip()) if scheme.lower() == "bearer" else None
        if info is None:
            self._role = "invalid"
            raise HubError(401, INVALID_CREDENTIALS)
        self._role = info.role
        return info

    def _repo(self, repo_id: str, token: TokenInfo | None) -> HubRepo:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            raise HubError(401 if token is None else 404, REPO_NOT_FOUND, "RepoNotFound")
        return repo

    def _revision(self, revision: str, repo: HubRepo | None = None) -> Revision:
        rev = self.state.resolve(revision, repo)
        if rev is None:
            raise HubError(404, revision_not_found_message(revision), "RevisionNotFound")
        return rev

    def _check_gated(self, repo: HubRepo, token: TokenInfo | None) -> None:
        if not repo.gated:
            return
        if token is None:
            raise HubError(401, gated_anonymous_message(repo.repo_id), "GatedRepo")
        if token.gated_access == "pending":
            raise HubError(403, gated_pending_message(repo.repo_id), "GatedRepo")
        if token.gated_access != "granted":
            raise HubError(403, gated_forbidden_message(repo.repo_id, self.state.hub_web),
                           "GatedRepo")
        if not token.can_read_gated:
            raise HubError(403, FINE_GRAINED_NO_GATED, "GatedRepo")

    def _hub(self, raw_path: str, query: dict[str, list[str]]) -> None:
        segs = raw_path.strip("/").split("/")
        if self.command not in ("GET", "HEAD"):
            self._kind = "unsupported"
            self.state.count_request(self._kind, self.client)
            raise HubError(405, f"{self.command} is not supported by the lab's Hub emulator")
        if segs[:2] == ["api", "whoami-v2"] and len(segs) == 2:
            self._kind = "whoami"
            self.state.count_request(self._kind, self.client)
            token = self._token()
            if token is None:
                raise HubError(401, INVALID_CREDENTIALS)
            self._send_json(200, whoami_json(token))
            return
        if len(segs) >= 3 and segs[:2] == ["api", "models"]:
            self._api_models(segs[2:], query)
            return
        if len(segs) >= 3 and "resolve" in segs[1:3]:
            self._kind = "resolve_head" if self.command == "HEAD" else "resolve_get"
            self.state.count_request(self._kind, self.client)
            at = segs.index("resolve", 1)
            repo_id = "/".join(unquote(s) for s in segs[:at])
            if len(segs) < at + 3:
                raise HubError(404, ENTRY_NOT_FOUND, "EntryNotFound")
            revision = unquote(segs[at + 1])
            path = unquote("/".join(segs[at + 2:]))
            self._resolve(repo_id, revision, path)
            return
        self._kind = "other"
        self.state.count_request(self._kind, self.client)
        raise HubError(404, "Not Found")

    def _api_models(self, rest: list[str], query: dict[str, list[str]]) -> None:
        kinds = {"revision": "model_info", "refs": "refs", "tree": "tree",
                 "auth-check": "auth_check"}
        if len(rest) >= 2 and rest[1] not in kinds:
            repo_id, tail = f"{unquote(rest[0])}/{unquote(rest[1])}", rest[2:]
        else:  # a repo id without a namespace ("gpt2"): none here, answered RepoNotFound
            repo_id, tail = unquote(rest[0]), rest[1:]
        kind = kinds.get(tail[0], "other") if tail else "model_info"
        self._kind = kind
        self.state.count_request(kind, self.client)
        token = self._token()
        repo = self._repo(repo_id, token)
        if kind == "other":
            raise HubError(404, "Not Found")
        if not tail or tail[0] == "revision":
            if tail and len(tail) != 2:
                raise HubError(404, "Not Found")
            rev = self._revision(unquote(tail[1]) if tail else "main", repo)
            blobs = query.get("blobs", ["false"])[-1].lower() in ("1", "true")
            expand = query.get("expand") or None
            self._send_json(200, model_info_json(self.state, repo, rev, blobs=blobs,
                                                 expand=expand))
        elif tail[0] == "refs":
            include_prs = query.get("include_prs", ["0"])[-1].lower() in ("1", "true")
            self._send_json(200, refs_json(self.state, include_prs))
        elif tail[0] == "tree":
            rev = self._revision(unquote(tail[1]) if len(tail) > 1 else "main", repo)
            path = unquote("/".join(tail[2:]))
            recursive = query.get("recursive", ["false"])[-1].lower() in ("1", "true")
            entries = tree_json(rev, path, recursive)
            if entries is None:
                raise HubError(404, ENTRY_NOT_FOUND, "EntryNotFound")
            self._send_json(200, entries)
        else:  # auth-check
            self._check_gated(repo, token)
            self._send_json(200, {})

    def _resolve(self, repo_id: str, revision: str, path: str) -> None:
        token = self._token()
        repo = self._repo(repo_id, token)
        rev = self._revision(revision, repo)
        self._check_gated(repo, token)
        f = rev.files.get(path)
        if f is None:
            raise HubError(404, ENTRY_NOT_FOUND, "EntryNotFound", {"X-Repo-Commit": rev.commit})
        headers = {
            "X-Repo-Commit": rev.commit,
            "ETag": f'"{f.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream" if f.lfs else "text/plain; charset=utf-8",
        }
        if f.lfs:
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
            headers["X-Linked-Size"] = str(f.size)
            name = f.path.rsplit("/", 1)[-1]
            headers["Content-Disposition"] = (f"inline; filename*=UTF-8''{name}; "
                                              f'filename="{name}";')
        wanted = parse_range(self.headers.get("Range"), f.size)
        if wanted == "unsatisfiable":
            self._status = 416
            self.send_response(416)
            for key, value in headers.items():
                self.send_header(key, _header_safe(value))
            self.send_header("Content-Range", f"bytes */{f.size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if wanted is None:
            status, start, end = 200, 0, f.size - 1
        else:
            assert isinstance(wanted, tuple)
            status, (start, end) = 206, wanted
            headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
        length = end - start + 1 if f.size else 0
        self._status = status
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, _header_safe(value))
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command == "HEAD":
            return
        self._send_body(repo.repo_id, f, start, length)

    def _send_body(self, repo_id: str, f: RepoFile, start: int, length: int) -> None:
        state = self.state
        cut = state.take_cut(repo_id, f.path, length)
        limit = length if cut is None else min(cut, length)
        state.count_download("started")
        with state.lock:
            bps = state.throttle_bps
        chunk = CHUNK if not bps else max(1, min(CHUNK, bps // 10))
        view = memoryview(f.content)[start:start + limit]
        sent = 0
        t0 = time.monotonic()
        try:
            while sent < limit:
                piece = view[sent:sent + chunk]
                self.wfile.write(piece)
                sent += len(piece)
                self._served = sent
                state.count_bytes(repo_id, f.path, self.client, len(piece))
                if bps:
                    ahead = sent / bps - (time.monotonic() - t0)
                    if ahead > 0:
                        time.sleep(ahead)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return
        if cut is not None:
            state.count_download("cut")
            self.close_connection = True
            try:
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        state.count_download("completed")


# --------------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------------


def make_hub_server(host: str, port: int, tokens: HubTokens | None = None, *,
                    state: HubState | None = None, **state_options: Any) -> HubServer:
    """A ready (not yet serving) emulator bound to ``host:port`` (port 0 picks a free one).

    ``host`` is any local address: 127.0.0.1 for the controller, the lab bridge IP for the lab
    hosts. Pass the ``state`` of another server to serve the same repositories and counters on a
    second address (see ``make_hub_servers``). ``state_options`` go to ``HubState``
    (``hub_web``, ``api_safetensors``, ``repos``). Serve with ``serve_forever()`` or
    ``start_background()``; stop with ``close()``.
    """
    if state is None:
        state = HubState(tokens=tokens or HubTokens(), **state_options)
    elif tokens is not None or state_options:
        raise ValueError("pass either a shared state or tokens/options, not both")
    return HubServer((host, port), state)


def make_hub_servers(hosts: Iterable[str], port: int, tokens: HubTokens | None = None,
                     **state_options: Any) -> list[HubServer]:
    """One emulator (one state, one byte counter) listening on several addresses, e.g.
    ``[bridge_ip, "127.0.0.1"]``. With port 0 the first address picks a free port and the others
    use the same number."""
    servers: list[HubServer] = []
    state: HubState | None = None
    try:
        for host in hosts:
            if state is None:
                server = make_hub_server(host, port, tokens, **state_options)
                state = server.state
                port = server.server_address[1]
            else:
                server = make_hub_server(host, port, state=state)
            servers.append(server)
    except BaseException:
        for s in servers:
            s.server_close()
        raise
    return servers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Lab stand-in for the Hugging Face Hub (not the Hugging Face Hub).")
    parser.add_argument("--host", action="append", default=None,
                        help="address to listen on (repeatable; default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token-file", type=Path,
                        help="file holding the token that has access (default: the built-in "
                             "lab token)")
    args = parser.parse_args(argv)
    tokens = HubTokens()
    if args.token_file:
        tokens = HubTokens(good=args.token_file.read_text().strip())
    servers = make_hub_servers(args.host or ["127.0.0.1"], args.port, tokens)
    for s in servers:
        s.start_background()
        print(base_url(s), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    for s in servers:
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

