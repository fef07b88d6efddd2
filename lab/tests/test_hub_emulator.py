"""The lab's Hugging Face Hub emulator and tiny model, driven by the REAL huggingface_hub client
(model_info, refs, tree, hf_hub_download, snapshot_download, get_safetensors_metadata,
auth_check, whoami) on 127.0.0.1. Nothing here may reach the internet: every request of the
client goes through a guard that only lets loopback addresses through."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from huggingface_hub import (
    HfApi,
    constants,
    hf_hub_download,
    set_client_factory,
    snapshot_download,
)
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils._http import default_client_factory, hf_request_event_hook

from gpufleet_lab import hub_emulator as he
from gpufleet_lab import tinymodel
from gpufleet_lab.hub_emulator import HubServer, base_url, make_hub_servers

PUBLIC, GATED = he.REPO_PUBLIC, he.REPO_GATED
MAIN, NEXT = tinymodel.COMMIT_MAIN, tinymodel.COMMIT_NEXT
WEIGHTS = tinymodel.SAFETENSORS_FILE
LOOPBACK = {"127.0.0.1", "127.0.0.2", "127.0.0.3"}


# --- isolation: no internet, no token files, no telemetry ---------------------------------------


def _loopback_only(request: httpx2.Request) -> None:
    if request.url.host not in LOOPBACK:
        raise AssertionError(f"a test tried to reach {request.url}")


@pytest.fixture(autouse=True)
def offline_hf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """huggingface_hub can only talk to loopback, has no token of its own and writes only under
    tmp_path."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a closed port, never the Hub
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))

    def factory() -> httpx2.Client:
        return httpx2.Client(event_hooks={"request": [hf_request_event_hook, _loopback_only]},
                             follow_redirects=True, timeout=None)

    set_client_factory(factory)
    yield home
    set_client_factory(default_client_factory)
    assert not (home / "token").exists()
    assert not (home / "stored_tokens").exists()


@pytest.fixture
def hub(hub_servers: Callable[..., HubServer]) -> Callable[..., HubServer]:
    return hub_servers


@pytest.fixture
def server(hub: Callable[..., HubServer]) -> HubServer:
    return hub()


@pytest.fixture
def endpoint(server: HubServer) -> str:
    return base_url(server)


def lab(endpoint: str, method: str, path: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(endpoint + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def stats(endpoint: str) -> dict[str, Any]:
    return lab(endpoint, "GET", "/_lab/stats")


def requests_log(endpoint: str) -> list[dict[str, Any]]:
    return lab(endpoint, "GET", "/_lab/requests")["requests"]


def raw(endpoint: str, method: str, path: str, headers: dict[str, str] | None = None
        ) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(endpoint + path, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def api(endpoint: str, token: str | bool = False) -> HfApi:
    return HfApi(endpoint=endpoint, token=token)


def content(path: str, variant: str = "main") -> bytes:
    return tinymodel.file_contents(variant)[path]


# --- the tiny model ----------------------------------------------------------------------------


def test_tiny_model_is_deterministic_and_its_commits_are_the_fixed_ones() -> None:
    revs = tinymodel.revisions()
    assert revs["main"].commit == MAIN and revs["next"].commit == NEXT
    assert revs["next"].parent == MAIN and revs["main"].parent is None
    assert tinymodel.safetensors_bytes() == content(WEIGHTS)
    main, nxt = tinymodel.file_contents("main"), tinymodel.file_contents("next")
    assert [p for p in main if main[p] != nxt[p]] == ["generation_config.json"]
    assert tinymodel.BRANCHES == {"main": MAIN, "next": NEXT}
    assert tinymodel.TAGS == {"v1.0": MAIN}
    assert 4_000_000 < len(main[WEIGHTS]) < 8_000_000  # big enough to cut mid-file


def test_tiny_model_git_ids_are_the_ones_git_computes(tmp_path: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "GIT_AUTHOR_NAME": "gpufleet lab", "GIT_COMMITTER_NAME": "gpufleet lab",
           "GIT_AUTHOR_EMAIL": "lab@gpufleet.invalid",
           "GIT_COMMITTER_EMAIL": "lab@gpufleet.invalid",
           "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}

    def git(*args: str, date: str = "") -> str:
        extra = {"GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date} if date else {}
        return subprocess.run(["git", "-c", "commit.gpgsign=false", *args], cwd=repo,
                              env={**env, **extra}, check=True, capture_output=True,
                              text=True).stdout.strip()

    git("init", "-q", "-b", "main", ".")
    for rev in tinymodel.revisions().values():
        for f in rev.files.values():  # git stores an LFS file as its pointer
            (repo / f.path).write_bytes(f.pointer if f.pointer is not None else f.content)
        git("add", "-A")
        git("commit", "-q", "-m", rev.message, date=f"{rev.timestamp} +0000")
        assert git("rev-parse", "HEAD") == rev.commit
        assert git("rev-parse", "HEAD^{tree}") == rev.tree
        for f in rev.files.values():
            assert git("hash-object", f.path) == f.blob_id


def test_tiny_model_safetensors_file_is_well_formed() -> None:
    data = content(WEIGHTS)
    (length,) = struct.unpack("<Q", data[:8])
    assert length % 8 == 0
    header = json.loads(data[8:8 + length])
    assert header.pop("__metadata__") == {"format": "pt"}
    offset = 0
    total = 0
    for name, info in header.items():  # contiguous, in order, nothing left over
        assert info["dtype"] == "BF16"
        n = 1
        for dim in info["shape"]:
            n *= dim
        assert info["data_offsets"] == [offset, offset + 2 * n], name
        offset += 2 * n
        total += n
    assert 8 + length + offset == len(data)
    assert total == tinymodel.parameter_count() == 2_524_544
    assert header["model.layers.0.self_attn.k_proj.weight"]["shape"] == [64, 128]
    assert header["model.layers.1.mlp.down_proj.weight"]["shape"] == [128, 3072]
    # bf16 -> f32: every weight finite and small, norms exactly 1.0
    body = data[8 + length:]
    start, end = header["model.embed_tokens.weight"]["data_offsets"]
    values = struct.unpack(f"<{(end - start) // 2}H", body[start:end])
    floats = [struct.unpack("<f", struct.pack("<I", v << 16))[0] for v in values]
    assert all(2**-7 <= abs(x) < 2**-5 for x in floats)
    start, end = header["model.norm.weight"]["data_offsets"]
    assert body[start:end] == b"\x80\x3f" * 128
    config = json.loads(content("config.json"))
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["head_dim"], config["torch_dtype"],
            config["max_position_embeddings"]) == (2, 128, 2, 1, 64, "bfloat16", 8192)
    assert content("README.md").startswith(b"---\nlicense: apache-2.0\n")
    assert len(json.loads(content("tokenizer.json"))["model"]["vocab"]) == config["vocab_size"]


def test_build_repo_writes_the_files(tmp_path: Path) -> None:
    files = tinymodel.build_repo(tmp_path / "next", "next")
    assert files == tinymodel.file_contents("next")
    assert (tmp_path / "next" / "generation_config.json").read_bytes() == files[
        "generation_config.json"]
    assert tinymodel.build_repo(tmp_path / "c", MAIN) == tinymodel.file_contents("main")
    with pytest.raises(ValueError):
        tinymodel.build_repo(tmp_path / "x", "nope")


# --- model info, refs, tree ----------------------------------------------------------------------


def test_model_info_of_the_public_repo(endpoint: str) -> None:
    info = api(endpoint).model_info(PUBLIC)
    assert info.id == PUBLIC and info.sha == MAIN
    assert info.gated is False and info.private is False
    assert [s.rfilename for s in info.siblings] == list(tinymodel.file_contents())
    assert info.siblings[0].size is None  # sizes only with files_metadata
    assert info.safetensors.parameters == {"BF16": 2_524_544}
    assert info.safetensors.total == 2_524_544
    assert info.card_data.license == "apache-2.0"
    assert info.config["architectures"] == ["LlamaForCausalLM"]


def test_model_info_with_files_metadata(endpoint: str) -> None:
    info = api(endpoint).model_info(PUBLIC, files_metadata=True)
    by_name = {s.rfilename: s for s in info.siblings}
    weights = by_name[WEIGHTS]
    data = content(WEIGHTS)
    assert weights.size == len(data)
    assert weights.lfs.sha256 == hashlib.sha256(data).hexdigest()
    assert weights.lfs.size == len(data) and weights.lfs.pointer_size == 132
    assert weights.blob_id == tinymodel.git_blob_id(tinymodel.lfs_pointer(data))
    config = by_name["config.json"]
    assert config.lfs is None and config.size == len(content("config.json"))
    assert config.blob_id == tinymodel.git_blob_id(content("config.json"))


@pytest.mark.parametrize("revision, commit", [
    ("main", MAIN), ("next", NEXT), ("v1.0", MAIN), (MAIN, MAIN), (NEXT, NEXT)])
def test_model_info_at_a_revision(endpoint: str, revision: str, commit: str) -> None:
    assert api(endpoint).model_info(PUBLIC, revision=revision).sha == commit


def test_model_info_expand_returns_only_what_was_asked(endpoint: str) -> None:
    info = api(endpoint).model_info(GATED, revision="next", expand=["sha", "gated"])
    assert (info.id, info.sha, info.gated) == (GATED, NEXT, "manual")
    assert info.siblings is None and info.safetensors is None


def test_unknown_repository_and_revision(endpoint: str) -> None:
    with pytest.raises(RepositoryNotFoundError) as anon:
        api(endpoint).model_info("gpufleet-lab/nope")
    assert anon.value.response.status_code == 401  # the Hub hides existence from anonymous users
    assert anon.value.response.headers["X-Error-Code"] == "RepoNotFound"
    with pytest.raises(RepositoryNotFoundError) as authed:
        api(endpoint, he.GOOD_TOKEN).model_info("gpufleet-lab/nope")
    assert authed.value.response.status_code == 404
    with pytest.raises(RevisionNotFoundError) as rev:
        api(endpoint).model_info(PUBLIC, revision="nope")
    assert rev.value.response.status_code == 404
    assert rev.value.server_message == "Invalid rev id: nope"
    with pytest.raises(RevisionNotFoundError):
        api(endpoint).model_info(PUBLIC, revision="0" * 40)


def test_refs_and_tree(endpoint: str) -> None:
    refs = api(endpoint).list_repo_refs(PUBLIC, include_pull_requests=True)
    assert {(b.name, b.ref, b.target_commit) for b in refs.branches} == {
        ("main", "refs/heads/main", MAIN), ("next", "refs/heads/next", NEXT)}
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1.0", MAIN)]
    assert refs.pull_requests == [] and refs.converts == []
    tree = list(api(endpoint).list_repo_tree(GATED, revision="next", recursive=True))
    assert sorted(f.path for f in tree) == sorted(tinymodel.file_contents())
    weights = next(f for f in tree if f.path == WEIGHTS)
    assert weights.lfs.sha256 == hashlib.sha256(content(WEIGHTS)).hexdigest()
    assert api(endpoint).list_repo_files(PUBLIC) == sorted(tinymodel.file_contents())


# --- downloads ---------------------------------------------------------------------------------


def test_hf_hub_download_of_every_file_builds_the_hf_cache_layout(endpoint: str,
                                                                   tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    for name, data in tinymodel.file_contents().items():
        path = Path(hf_hub_download(PUBLIC, name, endpoint=endpoint, cache_dir=cache,
                                    token=False))
        assert path.read_bytes() == data
    repo = cache / "models--gpufleet-lab--tiny-llama"
    assert (repo / "refs" / "main").read_text() == MAIN
    files = tinymodel.revisions()["main"].files
    assert sorted(p.name for p in (repo / "blobs").iterdir()) == sorted(
        f.etag for f in files.values())  # sha256 for LFS files, git blob id for the others
    weights = repo / "snapshots" / MAIN / WEIGHTS
    assert weights.is_symlink()
    assert os.readlink(weights) == f"../../blobs/{files[WEIGHTS].sha256}"
    assert os.readlink(repo / "snapshots" / MAIN / "config.json") == (
        f"../../blobs/{files['config.json'].blob_id}")
    served = stats(endpoint)["total_bytes"]
    assert served == sum(len(d) for d in tinymodel.file_contents().values())
    # again: HEAD requests only (the client checks the ETag), zero bytes of content
    lab(endpoint, "POST", "/_lab/stats/reset")
    for name in tinymodel.file_contents():
        hf_hub_download(PUBLIC, name, endpoint=endpoint, cache_dir=cache, token=False)
    after = stats(endpoint)
    assert after["total_bytes"] == 0
    assert after["requests_by_kind"] == {"resolve_head": len(files)}
    # pinned to the commit: not even a HEAD
    lab(endpoint, "POST", "/_lab/stats/reset")
    hf_hub_download(PUBLIC, WEIGHTS, revision=MAIN, endpoint=endpoint, cache_dir=cache,
                    token=False)
    assert stats(endpoint)["requests"] == 0


def test_changing_the_revision_downloads_only_the_file_that_changed(endpoint: str,
                                                                    tmp_path: Path) -> None:
    snapshot_download(PUBLIC, endpoint=endpoint, cache_dir=tmp_path, token=False)
    first = stats(endpoint)["total_bytes"]
    assert first == sum(len(d) for d in tinymodel.file_contents().values())
    lab(endpoint, "POST", "/_lab/stats/reset")
    path = snapshot_download(PUBLIC, revision="next", endpoint=endpoint, cache_dir=tmp_path,
                             token=False)
    assert Path(path).name == NEXT
    assert stats(endpoint)["bytes_by_file"] == {
        f"{PUBLIC}/generation_config.json": len(content("generation_config.json", "next"))}


def test_get_safetensors_metadata_reads_the_header_with_a_range_request(endpoint: str) -> None:
    meta = api(endpoint).get_safetensors_metadata(PUBLIC, revision="next")
    assert meta.sharded is False
    assert meta.parameter_count == {"BF16": 2_524_544}
    tensors = meta.files_metadata[WEIGHTS].tensors
    assert tensors["lm_head.weight"].shape == [259, 128]
    gets = [r for r in requests_log(endpoint) if r["method"] == "GET"]
    assert [(r["status"], r["range"]) for r in gets] == [(206, "bytes=0-100000")]
    assert stats(endpoint)["total_bytes"] == 100_001  # the header, not the 5 MB file


def test_range_requests(endpoint: str) -> None:
    data = content(WEIGHTS)
    url = f"/{PUBLIC}/resolve/main/{WEIGHTS}"
    status, headers, body = raw(endpoint, "GET", url, {"Range": "bytes=4000000-"})
    assert status == 206 and body == data[4_000_000:]
    assert headers["Content-Range"] == f"bytes 4000000-{len(data) - 1}/{len(data)}"
    assert int(headers["Content-Length"]) == len(data) - 4_000_000
    status, headers, body = raw(endpoint, "GET", url, {"Range": "bytes=10-19"})
    assert (status, body) == (206, data[10:20])
    status, _, body = raw(endpoint, "GET", url, {"Range": "bytes=-5"})
    assert (status, body) == (206, data[-5:])
    status, headers, _ = raw(endpoint, "GET", url, {"Range": f"bytes={len(data)}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(data)}"
    assert stats(endpoint)["total_bytes"] == (len(data) - 4_000_000) + 10 + 5


def test_head_headers_are_the_hubs(endpoint: str) -> None:
    files = tinymodel.revisions()["next"].files
    status, headers, body = raw(endpoint, "HEAD", f"/{GATED}/resolve/next/{WEIGHTS}",
                                {"Authorization": f"Bearer {he.GOOD_TOKEN}"})
    assert status == 200 and body == b""
    assert headers["X-Repo-Commit"] == NEXT
    assert headers["ETag"] == headers["X-Linked-Etag"] == f'"{files[WEIGHTS].sha256}"'
    assert headers["X-Linked-Size"] == headers["Content-Length"] == str(files[WEIGHTS].size)
    assert headers["Accept-Ranges"] == "bytes"
    status, headers, _ = raw(endpoint, "HEAD", f"/{PUBLIC}/resolve/{NEXT}/config.json")
    assert headers["ETag"] == f'"{files["config.json"].blob_id}"'
    assert "X-Linked-Etag" not in headers
    status, headers, _ = raw(endpoint, "HEAD", f"/{PUBLIC}/resolve/main/nope.json")
    assert (status, headers["X-Error-Code"], headers["X-Repo-Commit"]) == (
        404, "EntryNotFound", MAIN)
    assert stats(endpoint)["total_bytes"] == 0


# --- interrupted downloads: what the real client does (measured) --------------------------------


def test_cut_download_in_the_first_chunk_is_restarted_from_zero(endpoint: str,
                                                                tmp_path: Path) -> None:
    """huggingface_hub reads the body in DOWNLOAD_CHUNK_SIZE (10 MiB) pieces and only counts
    bytes it has handed to the file: a cut inside the first 10 MiB resumes at 0, i.e. a new GET
    without a Range header, after a 1 s pause. (Larger files resume at the last full 10 MiB.)"""
    data = content(WEIGHTS)
    lab(endpoint, "POST", "/_lab/faults", {"cut_after_bytes": 1_000_000, "count": 1,
                                           "path": "*.safetensors"})
    path = hf_hub_download(PUBLIC, WEIGHTS, endpoint=endpoint, cache_dir=tmp_path, token=False)
    assert Path(path).read_bytes() == data
    gets = [(r["status"], r["range"], r["bytes"])
            for r in requests_log(endpoint) if r["method"] == "GET"]
    assert gets == [(200, None, 1_000_000), (200, None, len(data))]
    s = stats(endpoint)
    assert s["downloads"] == {"started": 2, "completed": 1, "cut": 1}
    assert s["bytes_by_file"][f"{PUBLIC}/{WEIGHTS}"] == 1_000_000 + len(data)


def test_cut_download_resumes_with_a_range_after_the_last_full_chunk(
        endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With 256 KiB chunks (10 MiB on real-size files), the client resumes with
    ``Range: bytes=<bytes written>-`` and the emulator serves only the remainder (206)."""
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 256 * 1024)
    data = content(WEIGHTS)
    lab(endpoint, "POST", "/_lab/faults", {"cut_after_bytes": 1_000_000, "count": 1})
    path = hf_hub_download(PUBLIC, WEIGHTS, endpoint=endpoint, cache_dir=tmp_path, token=False)
    assert Path(path).read_bytes() == data
    kept = (1_000_000 // (256 * 1024)) * 256 * 1024  # 786432: the last full chunk written
    gets = [(r["status"], r["range"], r["bytes"])
            for r in requests_log(endpoint) if r["method"] == "GET"]
    assert gets == [(200, None, 1_000_000), (206, f"bytes={kept}-", len(data) - kept)]
    assert stats(endpoint)["total_bytes"] == 1_000_000 + len(data) - kept


def test_a_failed_download_leaves_nothing_for_the_next_process(endpoint: str,
                                                               tmp_path: Path) -> None:
    """Across calls (and processes) there is no resume: after 5 retries the client gives up and
    deletes its process-unique ``.incomplete`` file; the next call starts from byte 0. Resuming
    across processes is the host-side staging's job (the emulator supports Range for it)."""
    lab(endpoint, "POST", "/_lab/faults", {"cut_after_bytes": 500_000, "count": 6})
    with pytest.raises(httpx2.RemoteProtocolError):
        hf_hub_download(PUBLIC, WEIGHTS, endpoint=endpoint, cache_dir=tmp_path, token=False)
    blobs = tmp_path / "models--gpufleet-lab--tiny-llama" / "blobs"
    assert list(blobs.iterdir()) == []
    lab(endpoint, "POST", "/_lab/stats/reset")
    hf_hub_download(PUBLIC, WEIGHTS, endpoint=endpoint, cache_dir=tmp_path, token=False)
    gets = [r for r in requests_log(endpoint) if r["method"] == "GET"]
    assert [(r["range"], r["bytes"]) for r in gets] == [(None, len(content(WEIGHTS)))]


def test_fault_knobs(endpoint: str) -> None:
    state = lab(endpoint, "POST", "/_lab/faults", {"cut_after_bytes": 10, "count": 2,
                                                   "path": "config.json", "repo": GATED})
    assert state["faults"] == [{"cut_after_bytes": 10, "count": 2, "path": "config.json",
                                "repo": GATED}]
    # other files and repos are not cut, and do not consume the fault
    status, _, body = raw(endpoint, "GET", f"/{PUBLIC}/resolve/main/config.json")
    assert (status, body) == (200, content("config.json"))
    assert lab(endpoint, "GET", "/_lab/faults")["faults"][0]["count"] == 2
    conn = http.client.HTTPConnection("127.0.0.1", int(endpoint.rsplit(":", 1)[1]), timeout=10)
    conn.request("GET", f"/{GATED}/resolve/main/config.json",
                 headers={"Authorization": f"Bearer {he.GOOD_TOKEN}"})
    resp = conn.getresponse()
    with pytest.raises(http.client.IncompleteRead) as cut:
        resp.read()
    assert cut.value.partial == content("config.json")[:10]
    conn.close()
    assert lab(endpoint, "GET", "/_lab/faults")["faults"][0]["count"] == 1
    assert lab(endpoint, "DELETE", "/_lab/faults") == {"faults": [],
                                                      "throttle_bytes_per_second": 0}
    lab(endpoint, "POST", "/_lab/faults", {"throttle_bytes_per_second": 1_000_000})
    t0 = time.monotonic()
    status, _, body = raw(endpoint, "GET", f"/{PUBLIC}/resolve/main/{WEIGHTS}",
                          {"Range": "bytes=0-299999"})
    assert status == 206 and len(body) == 300_000
    assert time.monotonic() - t0 >= 0.25
    lab(endpoint, "DELETE", "/_lab/faults")
    with pytest.raises(urllib.error.HTTPError) as bad:
        lab(endpoint, "POST", "/_lab/faults", {"cut_after_bytes": "lots"})
    assert bad.value.code == 400


# --- gated repository, tokens ---------------------------------------------------------------------


def test_gated_repo_info_is_public_but_its_files_are_not(endpoint: str, tmp_path: Path) -> None:
    info = api(endpoint).model_info(GATED, files_metadata=True)
    assert info.gated == "manual" and info.sha == MAIN
    assert {s.rfilename for s in info.siblings} == set(tinymodel.file_contents())
    with pytest.raises(GatedRepoError) as err:
        hf_hub_download(GATED, "config.json", endpoint=endpoint, cache_dir=tmp_path,
                        token=False)
    assert err.value.response.status_code == 401
    assert err.value.response.headers["X-Error-Code"] == "GatedRepo"
    assert err.value.server_message == (
        f"Access to model {GATED} is restricted. You must have access to it and be "
        "authenticated to access it. Please log in.")
    assert stats(endpoint)["total_bytes"] == 0


@pytest.mark.parametrize("token, message", [
    (he.NO_ACCESS_TOKEN, f"Access to model {GATED} is restricted and you are not in the "
                         f"authorized list. Visit https://huggingface.co/{GATED} to ask for "
                         "access."),
    (he.PENDING_TOKEN, f"Your request to access model {GATED} is awaiting a review from the "
                       "repo authors."),
    (he.NO_GATED_SCOPE_TOKEN, "Please enable access to public gated repositories in your "
                              "fine-grained token settings to view this repository."),
])
def test_gated_repo_with_a_token_without_access_is_403(endpoint: str, tmp_path: Path,
                                                       token: str, message: str) -> None:
    with pytest.raises(GatedRepoError) as err:
        hf_hub_download(GATED, "config.json", endpoint=endpoint, cache_dir=tmp_path,
                        token=token)
    assert err.value.response.status_code == 403
    assert err.value.server_message == message
    assert token not in str(err.value)
    with pytest.raises(GatedRepoError):
        api(endpoint, token).auth_check(GATED)
    api(endpoint, token).auth_check(PUBLIC)  # public: fine
    # the public repository downloads with any valid token
    assert Path(hf_hub_download(PUBLIC, "config.json", endpoint=endpoint, cache_dir=tmp_path,
                                token=token)).read_bytes() == content("config.json")


def test_gated_repo_with_the_good_token(endpoint: str, tmp_path: Path) -> None:
    api(endpoint, he.GOOD_TOKEN).auth_check(GATED)
    path = snapshot_download(GATED, endpoint=endpoint, cache_dir=tmp_path, token=he.GOOD_TOKEN)
    assert (Path(path) / WEIGHTS).read_bytes() == content(WEIGHTS)
    log = requests_log(endpoint)
    assert {r["token"] for r in log} == {"good"}
    assert stats(endpoint)["bytes_by_repo"] == {
        GATED: sum(len(d) for d in tinymodel.file_contents().values())}
    with pytest.raises(GatedRepoError) as err:
        api(endpoint).auth_check(GATED)
    assert err.value.response.status_code == 401


def test_an_invalid_token_is_refused_even_for_a_public_repo(endpoint: str,
                                                            tmp_path: Path) -> None:
    bad = "hf_thisTokenDoesNotExistAnywhere00000"
    with pytest.raises(HfHubHTTPError) as err:
        api(endpoint, bad).model_info(PUBLIC)
    assert not isinstance(err.value, RepositoryNotFoundError)
    assert err.value.response.status_code == 401
    assert err.value.server_message == "Invalid credentials in Authorization header"
    with pytest.raises(HfHubHTTPError) as dl:
        hf_hub_download(PUBLIC, "config.json", endpoint=endpoint, cache_dir=tmp_path, token=bad)
    assert dl.value.response.status_code == 401
    assert bad not in str(err.value) + str(dl.value)
    assert [r["token"] for r in requests_log(endpoint)] == ["invalid", "invalid"]


def test_whoami(endpoint: str) -> None:
    me = api(endpoint, he.GOOD_TOKEN).whoami()
    assert me["name"] == "lab-user" and me["type"] == "user"
    assert me["auth"]["accessToken"]["role"] == "read"
    fine = api(endpoint, he.NO_GATED_SCOPE_TOKEN).whoami()
    assert fine["auth"]["accessToken"]["role"] == "fineGrained"
    assert fine["auth"]["accessToken"]["fineGrained"]["canReadGatedRepos"] is False
    assert api(endpoint, he.NO_ACCESS_TOKEN).whoami()["name"] == "lab-stranger"
    with pytest.raises(HfHubHTTPError, match="Invalid user token"):
        api(endpoint, "hf_unknown").whoami()


def test_custom_tokens(hub: Callable[..., HubServer]) -> None:
    server = hub(tokens=he.HubTokens(good="hf_labToken", no_access=None, pending=None,
                                     no_gated_scope=None))
    endpoint = base_url(server)
    api(endpoint, "hf_labToken").auth_check(GATED)
    with pytest.raises(HfHubHTTPError) as err:
        api(endpoint, he.GOOD_TOKEN).auth_check(GATED)  # the built-in one is unknown here
    assert err.value.response.status_code == 401


# --- what a lab serves, by engine ---------------------------------------------------------------


LLAMA3 = he.REPO_LLAMA3_8B


@pytest.mark.parametrize("engine", he.ENGINES)
def test_a_lab_serves_the_same_repo_ids_for_either_engine(engine: str) -> None:
    repos = he.lab_repos(engine)
    assert set(repos) == {PUBLIC, GATED, LLAMA3}
    assert repos[LLAMA3].gated == "manual"


def test_a_stand_in_lab_serves_llama3_8bs_real_config_over_the_tiny_weights(
        hub: Callable[..., HubServer], tmp_path: Path) -> None:
    endpoint = base_url(hub(repos=he.lab_repos("standin")))
    info = api(endpoint).model_info(LLAMA3)
    assert info.safetensors.total == 8_030_261_248  # the planner sees Llama 3 8B
    config = hf_hub_download(LLAMA3, "config.json", endpoint=endpoint, cache_dir=tmp_path,
                             token=he.GOOD_TOKEN)
    assert json.loads(Path(config).read_text()) == he.LLAMA3_8B_CONFIG
    weights = hf_hub_download(LLAMA3, WEIGHTS, endpoint=endpoint, cache_dir=tmp_path,
                              token=he.GOOD_TOKEN)
    assert Path(weights).read_bytes() == content(WEIGHTS)  # staging moves 5 MB


def test_a_real_engine_lab_serves_the_tiny_model_under_the_llama3_id(
        hub: Callable[..., HubServer], tmp_path: Path) -> None:
    endpoint = base_url(hub(repos=he.lab_repos("real")))
    info = api(endpoint).model_info(LLAMA3)
    assert info.safetensors.parameters == {"BF16": tinymodel.parameter_count()}
    path = Path(snapshot_download(LLAMA3, revision=MAIN, endpoint=endpoint, cache_dir=tmp_path,
                                  token=he.GOOD_TOKEN))
    assert path.name == MAIN
    assert {f.name: f.read_bytes() for f in path.iterdir()} == tinymodel.file_contents("main")


def test_an_unknown_lab_engine_is_one_clear_line() -> None:
    with pytest.raises(ValueError) as err:
        he.lab_repos("gpu")
    assert str(err.value) == "unknown lab engine 'gpu': use one of standin, real"


# --- byte counter, addresses ----------------------------------------------------------------------


def test_byte_counter_per_repo_client_and_file(endpoint: str) -> None:
    raw(endpoint, "GET", f"/{PUBLIC}/resolve/main/config.json")
    raw(endpoint, "GET", f"/{GATED}/resolve/next/generation_config.json",
        {"Authorization": f"Bearer {he.GOOD_TOKEN}"})
    raw(endpoint, "HEAD", f"/{PUBLIC}/resolve/main/{WEIGHTS}")
    raw(endpoint, "GET", f"/api/models/{PUBLIC}")
    c, g = len(content("config.json")), len(content("generation_config.json", "next"))
    s = stats(endpoint)
    assert s["total_bytes"] == c + g
    assert s["bytes_by_repo"] == {PUBLIC: c, GATED: g}
    assert s["bytes_by_client"] == {"127.0.0.1": c + g}
    assert s["bytes_by_file"] == {f"{PUBLIC}/config.json": c,
                                  f"{GATED}/generation_config.json": g}
    assert s["requests"] == 4
    assert s["requests_by_kind"] == {"resolve_get": 2, "resolve_head": 1, "model_info": 1}
    assert s["downloads"] == {"started": 2, "completed": 2, "cut": 0}
    reset = lab(endpoint, "POST", "/_lab/stats/reset")
    assert reset["total_bytes"] == 0 and reset["requests"] == 0
    assert requests_log(endpoint) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_one_emulator_on_two_addresses_shares_its_counters() -> None:
    """The lab runs it on the bridge IP (hosts) and 127.0.0.1 (controller); 127.0.0.2 stands in
    for the bridge here. Clients are told apart by their source address."""
    try:
        servers = make_hub_servers(["127.0.0.2", "127.0.0.1"], _free_port())
    except OSError as e:
        pytest.skip(f"cannot bind 127.0.0.2: {e}")
    try:
        for s in servers:
            s.start_background()
        assert servers[0].state is servers[1].state
        assert servers[0].server_address[1] == servers[1].server_address[1]
        port = servers[0].server_address[1]
        for host, source in (("127.0.0.2", "127.0.0.3"), ("127.0.0.1", "127.0.0.1")):
            conn = http.client.HTTPConnection(host, port, timeout=10,
                                              source_address=(source, 0))
            conn.request("GET", f"/{PUBLIC}/resolve/main/config.json")
            assert conn.getresponse().read() == content("config.json")
            conn.close()
        c = len(content("config.json"))
        s = stats(base_url(servers[1]))
        assert s["bytes_by_client"] == {"127.0.0.3": c, "127.0.0.1": c}
        assert s["total_bytes"] == 2 * c
    finally:
        for s in servers:
            s.close()


def test_unknown_paths_and_methods(endpoint: str) -> None:
    assert raw(endpoint, "GET", "/api/spaces/x/y")[0] == 404
    assert raw(endpoint, "DELETE", f"/api/models/{PUBLIC}")[0] == 405
    status, headers, body = raw(endpoint, "GET", "/api/models/gpt2")
    assert (status, headers["X-Error-Code"]) == (401, "RepoNotFound")
    assert json.loads(body) == {"error": "Repository not found"}
    assert raw(endpoint, "GET", "/_lab/nope")[0] == 404
    # an early error answer to a request with a body keeps the kept-alive connection usable
    conn = http.client.HTTPConnection("127.0.0.1", int(endpoint.rsplit(":", 1)[1]), timeout=10)
    conn.request("POST", f"/api/models/{PUBLIC}", body=b'{"x": 1}' * 100)
    assert conn.getresponse().read() and True
    conn.request("GET", f"/{PUBLIC}/resolve/main/config.json")
    resp = conn.getresponse()
    assert (resp.status, resp.read()) == (200, content("config.json"))
    conn.close()


def test_command_line(tmp_path: Path) -> None:
    token_file = tmp_path / "hf-token"
    token_file.write_text("hf_labTokenFromAFile\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpufleet_lab.hub_emulator", "--host", "127.0.0.1", "--port", "0",
         "--token-file", str(token_file)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        assert api(url, "hf_labTokenFromAFile").whoami()["name"] == "lab-user"
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_the_guard_keeps_the_client_off_the_internet() -> None:
    with pytest.raises(AssertionError, match="tried to reach https://huggingface.co"):
        HfApi(endpoint="https://huggingface.co", token=False).model_info(PUBLIC)
