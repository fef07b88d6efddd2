"""gpufleet.clients.hub against the lab's Hub emulator (real huggingface_hub client, 127.0.0.1 only):
revision resolution, the access check's messages, the model shape of the tiny model, the cache."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from huggingface_hub import constants, set_client_factory
from huggingface_hub.utils._http import default_client_factory, hf_request_event_hook
from pyinfra.api.exceptions import PyinfraError

from gpufleet.clients import hub
from gpufleet.clients.hub import (
    HubAccessError,
    HubModelError,
    check_access,
    model_shape,
    resolve_revision,
    shape_from_config,
    staged_files,
)
from gpufleet.model.model_shape import ModelShape
from gpufleet.model.secrets import Secret
from gpufleet_lab import hub_emulator as he
from gpufleet_lab import tinymodel
from gpufleet_lab.hub_emulator import HubServer, base_url

PUBLIC, GATED = he.REPO_PUBLIC, he.REPO_GATED
MAIN, NEXT = tinymodel.COMMIT_MAIN, tinymodel.COMMIT_NEXT
TOKENS = (he.GOOD_TOKEN, he.NO_ACCESS_TOKEN, he.PENDING_TOKEN, he.NO_GATED_SCOPE_TOKEN)
BAD_TOKEN = "hf_invalidTokenForGpufleetTests0000"


def _loopback_only(request: httpx2.Request) -> None:
    if request.url.host != "127.0.0.1":
        raise AssertionError(f"a test tried to reach {request.url}")


@pytest.fixture(autouse=True)
def offline_hf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """huggingface_hub only reaches 127.0.0.1, has no token of its own, writes under tmp_path;
    gpufleet's state dir is in tmp_path too. HF_ENDPOINT points to a closed port so that a code
    path that forgot the endpoint fails instead of going to huggingface.co."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("GPUFLEET_STATE_DIR", str(tmp_path / "state"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
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
    assert not (home / "token").exists() and not (home / "stored_tokens").exists()
    assert not (home / "hub").exists()  # gpufleet.clients.hub never uses the user's HF cache


@pytest.fixture
def hub_server(hub_servers: Callable[..., HubServer]) -> Callable[..., HubServer]:
    return hub_servers


@pytest.fixture(autouse=True)
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The retries' waits, recorded instead of slept (every test runs without real backoff)."""
    slept: list[float] = []
    monkeypatch.setattr(hub, "DEFAULT_RETRY", hub.Retry(sleep=slept.append))
    return slept


def fail_next(monkeypatch: pytest.MonkeyPatch, answers: list[tuple[int, dict[str, str]]],
              path_part: str = "") -> list[str]:
    """The emulator answers the next requests whose path contains ``path_part`` with these
    (status, headers) instead of serving them; returns the paths that got them."""
    failed: list[str] = []
    real = he._Handler._hub

    def hub_with_faults(self: Any, raw_path: str, query: dict[str, list[str]]) -> None:
        if answers and path_part in raw_path:
            status, headers = answers.pop(0)
            failed.append(raw_path)
            raise he.HubError(status, {429: "Too Many Requests", 500: "Internal Error",
                                       502: "Bad Gateway", 503: "Service Unavailable",
                                       504: "Gateway Timeout"}.get(status, "Fault"),
                              headers=headers)
        real(self, raw_path, query)

    monkeypatch.setattr(he._Handler, "_hub", hub_with_faults)
    return failed


@pytest.fixture
def endpoint(hub_server: Callable[..., HubServer]) -> str:
    return base_url(hub_server())


def stats(server_or_endpoint: HubServer | str) -> dict[str, Any]:
    if isinstance(server_or_endpoint, HubServer):
        return server_or_endpoint.state.snapshot()
    import urllib.request

    with urllib.request.urlopen(server_or_endpoint + "/_lab/stats", timeout=10) as resp:
        return json.loads(resp.read())


def reset(endpoint: str) -> None:
    import urllib.request

    req = urllib.request.Request(endpoint + "/_lab/stats/reset", method="POST")
    urllib.request.urlopen(req, timeout=10).close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- messages -------------------------------------------------------------------------------------


def test_the_gated_message_names_the_model_page_and_the_permission() -> None:
    assert hub.msg_gated_no_token("meta-llama/Meta-Llama-3-8B-Instruct") == (
        "meta-llama/Meta-Llama-3-8B-Instruct is gated: set HF_TOKEN to a token of an account "
        "that accepted the licence at https://huggingface.co/meta-llama/Meta-Llama-3-8B-Instruct;"
        " the token needs 'Read access to contents of all public gated repos you can access' "
        "(fine-grained) or the read role")
    assert issubclass(HubAccessError, PyinfraError) and issubclass(HubModelError, PyinfraError)


# --- revision ------------------------------------------------------------------------------------


@pytest.mark.parametrize("revision, commit", [
    ("main", MAIN), ("next", NEXT), ("v1.0", MAIN), (MAIN, MAIN), (NEXT, NEXT)])
def test_resolve_revision(endpoint: str, revision: str, commit: str) -> None:
    assert resolve_revision(PUBLIC, revision, None, endpoint) == commit
    assert stats(endpoint)["requests"] == 1


def test_resolve_revision_of_a_gated_model_needs_no_token(endpoint: str) -> None:
    assert resolve_revision(GATED, "next", None, endpoint) == NEXT


@pytest.mark.parametrize("revision", ["nope", "0" * 40])
def test_unknown_revision(endpoint: str, revision: str) -> None:
    with pytest.raises(HubAccessError) as err:
        resolve_revision(PUBLIC, revision, None, endpoint)
    assert str(err.value) == hub.msg_revision_not_found(PUBLIC, revision, endpoint)
    assert str(err.value) == (
        f"revision '{revision}' of {PUBLIC} was not found on {endpoint}: use a branch, a tag or "
        f"a full 40-character commit id of the repository ({endpoint}/{PUBLIC}/commits/main "
        "lists the commits of main)")


# --- access -------------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "", he.GOOD_TOKEN, he.NO_ACCESS_TOKEN])
def test_a_public_model_needs_no_token(endpoint: str, token: str | None) -> None:
    assert check_access(PUBLIC, "main", token, endpoint) == MAIN
    s = stats(endpoint)
    assert s["requests"] == 1 and s["total_bytes"] == 0


def test_a_gated_model_with_a_token_that_has_access(endpoint: str) -> None:
    assert check_access(GATED, "next", he.GOOD_TOKEN, endpoint) == NEXT
    s = stats(endpoint)
    assert s["requests_by_kind"] == {"model_info": 1, "resolve_head": 1}
    assert s["total_bytes"] == 0  # a HEAD: no bytes


def _expected(kind: str, model: str, endpoint: str) -> str:
    return {
        "no_token": (f"{model} is gated: set HF_TOKEN to a token of an account that accepted "
                     f"the licence at {endpoint}/{model}; the token needs 'Read access to "
                     "contents of all public gated repos you can access' (fine-grained) or the "
                     "read role"),
        "no_access": (f"{model} is gated and the account of HF_TOKEN has no access to it "
                      f"(licence not accepted): log in as that account and request access at "
                      f"{endpoint}/{model}, then deploy again; the token needs 'Read access to "
                      "contents of all public gated repos you can access' (fine-grained) or "
                      "the read role"),
        "pending": (f"{model} is gated and the access request of HF_TOKEN's account is "
                    f"awaiting review by the model's authors: deploy again once "
                    f"{endpoint}/{model} shows that access was granted"),
        "scope": (f"{model} is gated and HF_TOKEN is a fine-grained token without 'Read access "
                  f"to contents of all public gated repos you can access': enable it at "
                  f"{endpoint}/settings/tokens (or use a token with the read role); access to "
                  f"the model itself is requested at {endpoint}/{model}"),
        "invalid": (f"HF_TOKEN was rejected by {endpoint} (invalid, expired or revoked token) "
                    f"while reading {model}: create a token at {endpoint}/settings/tokens with "
                    "'Read access to contents of all public gated repos you can access' "
                    "(fine-grained) or the read role; for a public model, `export HF_TOKEN=` "
                    "deploys without one"),
    }[kind]


@pytest.mark.parametrize("token, kind", [
    (None, "no_token"), ("", "no_token"), (he.NO_ACCESS_TOKEN, "no_access"),
    (he.PENDING_TOKEN, "pending"), (he.NO_GATED_SCOPE_TOKEN, "scope"), (BAD_TOKEN, "invalid")])
def test_gated_model_access_errors(endpoint: str, token: str | None, kind: str) -> None:
    with pytest.raises(HubAccessError) as err:
        check_access(GATED, "main", token, endpoint)
    message = str(err.value)
    assert message == _expected(kind, GATED, endpoint)
    assert "\n" not in message
    for secret in (*TOKENS, BAD_TOKEN):
        assert secret not in message
    assert err.value.__cause__ is None  # the client's own (longer) error is not chained
    assert stats(endpoint)["total_bytes"] == 0


def test_an_invalid_token_fails_for_a_public_model_too(endpoint: str) -> None:
    with pytest.raises(HubAccessError) as err:
        check_access(PUBLIC, "main", BAD_TOKEN, endpoint)
    assert str(err.value) == _expected("invalid", PUBLIC, endpoint)


def test_unknown_model(endpoint: str) -> None:
    for token, hint in ((None, "if it is private, set HF_TOKEN to a token of an account that "
                               "can read it"),
                        (he.GOOD_TOKEN, "if it is private, the account of HF_TOKEN cannot read "
                                        "it")):
        with pytest.raises(HubAccessError) as err:
            check_access("gpufleet-lab/nope", "main", token, endpoint)
        assert str(err.value) == (
            f"gpufleet-lab/nope was not found on {endpoint}: check the model id in the spec "
            f"(organisation/name, as in {endpoint}/gpufleet-lab/nope); {hint}")


def test_unreachable_endpoint() -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(HubAccessError) as err:
        check_access(PUBLIC, "main", he.GOOD_TOKEN, endpoint)
    assert str(err.value).startswith(
        f"cannot reach the Hugging Face Hub at {endpoint} to read {PUBLIC} (ConnectError: ")
    assert str(err.value).endswith(
        "; tried 4 times): check the controller's network and proxy settings, or HF_ENDPOINT")
    assert he.GOOD_TOKEN not in str(err.value)


# --- retries of transient failures --------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_a_single_server_error_at_preflight_is_retried(endpoint: str, status: int,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       waits: list[float]) -> None:
    failed = fail_next(monkeypatch, [(status, {})])
    assert check_access(PUBLIC, "main", None, endpoint) == MAIN
    assert failed == [f"/api/models/{PUBLIC}/revision/main"] and waits == [1.0]


def test_a_server_error_on_a_file_of_the_shape_is_retried(endpoint: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          waits: list[float]) -> None:
    failed = fail_next(monkeypatch, [(502, {})], path_part="/resolve/")
    shape = model_shape(PUBLIC, "main", None, endpoint, tmp_path)
    assert shape.commit == MAIN and len(failed) == 1 and waits == [1.0]
    # the gated model's HEAD in check_access too
    failed = fail_next(monkeypatch, [(503, {})], path_part="/resolve/")
    assert check_access(GATED, "main", he.GOOD_TOKEN, endpoint) == MAIN
    assert failed == [f"/{GATED}/resolve/{MAIN}/config.json"]


def test_a_cut_connection_while_reading_the_shape_is_retried(endpoint: str, tmp_path: Path,
                                                             waits: list[float]) -> None:
    # the emulator's own fault injection: the config.json download is cut after 10 bytes
    import urllib.request

    body = json.dumps({"cut_after_bytes": 10, "count": 1, "path": "config.json"}).encode()
    urllib.request.urlopen(urllib.request.Request(endpoint + "/_lab/faults", data=body,
                                                  method="POST"), timeout=10).close()
    shape = model_shape(PUBLIC, "main", None, endpoint, tmp_path)
    assert shape.num_layers > 0 and stats(endpoint)["downloads"]["cut"] == 1
    assert waits == [1.0]


def test_four_server_errors_in_a_row_fail_with_one_clear_line(endpoint: str,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              waits: list[float]) -> None:
    failed = fail_next(monkeypatch, [(503, {})] * 5)
    with pytest.raises(HubAccessError) as err:
        check_access(GATED, "main", he.GOOD_TOKEN, endpoint)
    assert str(err.value) == (
        f"the Hugging Face Hub at {endpoint} answered HTTP 503 for {GATED} "
        f"(GET /api/models/{GATED}/revision/main; tried 4 times): Service Unavailable; "
        "the Hub is having trouble: deploy again later")
    assert "\n" not in str(err.value) and he.GOOD_TOKEN not in str(err.value)
    assert len(failed) == 4 and waits == [1.0, 2.0, 4.0]  # bounded exponential backoff


def test_a_429_honours_retry_after_capped_at_30_seconds(endpoint: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        waits: list[float]) -> None:
    fail_next(monkeypatch, [(429, {"Retry-After": "7"}), (429, {"Retry-After": "3600"}),
                            (429, {})])
    assert resolve_revision(PUBLIC, "next", None, endpoint) == NEXT
    assert waits == [7.0, 30.0, 4.0]


@pytest.mark.parametrize("token, status", [(he.NO_ACCESS_TOKEN, 403), (None, 401),
                                           (BAD_TOKEN, 401)])
def test_access_errors_are_never_retried(endpoint: str, token: str | None, status: int,
                                         waits: list[float]) -> None:
    reset(endpoint)
    with pytest.raises(HubAccessError):
        check_access(GATED, "main", token, endpoint)
    assert waits == []
    assert {r["status"] for r in he_requests(endpoint)} <= {200, status}
    assert sum(r["status"] == status for r in he_requests(endpoint)) == 1


def test_an_unknown_model_is_not_retried(endpoint: str, waits: list[float]) -> None:
    with pytest.raises(HubAccessError, match="was not found"):
        check_access("gpufleet-lab/nope", "main", he.GOOD_TOKEN, endpoint)
    with pytest.raises(HubAccessError, match="revision 'nope'"):
        model_shape(PUBLIC, "nope", None, endpoint)
    assert waits == []


def test_retry_is_injectable_per_call(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    fail_next(monkeypatch, [(500, {})] * 2)
    retry = hub.Retry(attempts=2, backoff_s=0.01, sleep=slept.append)
    with pytest.raises(HubAccessError, match="tried 2 times"):
        check_access(PUBLIC, "main", None, endpoint, retry=retry)
    assert slept == [0.01]


def he_requests(endpoint: str) -> list[dict[str, Any]]:
    import urllib.request

    with urllib.request.urlopen(endpoint + "/_lab/requests", timeout=10) as resp:
        return json.loads(resp.read())["requests"]


def test_an_endpoint_that_is_not_a_hub(endpoint: str) -> None:
    with pytest.raises(HubAccessError) as err:
        check_access(PUBLIC, "main", None, endpoint + "/_lab")
    assert str(err.value) == (f"the Hugging Face Hub at {endpoint}/_lab answered HTTP 404 for "
                              f"{PUBLIC}: no lab endpoint GET /_lab/api/models/{PUBLIC}/revision/main")


def test_offline_mode_on_the_controller(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubAccessError) as err:
        check_access(PUBLIC, "main", None, endpoint)
    assert str(err.value) == hub.msg_offline(PUBLIC, endpoint)


def test_invalid_model_id(endpoint: str) -> None:
    with pytest.raises(HubAccessError, match="'not a model' is not a valid Hugging Face model"):
        check_access("not a model", "main", None, endpoint)


def test_hf_token_and_hf_endpoint_from_the_environment(endpoint: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", endpoint + "/")
    monkeypatch.setenv("HF_TOKEN", he.GOOD_TOKEN)
    assert check_access(GATED) == MAIN
    assert resolve_revision(GATED, "next") == NEXT
    assert hub.hub_endpoint() == endpoint
    # "" means anonymous even with HF_TOKEN set
    with pytest.raises(HubAccessError) as err:
        check_access(GATED, "main", "")
    assert str(err.value) == _expected("no_token", GATED, endpoint)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", he.NO_ACCESS_TOKEN)
    with pytest.raises(HubAccessError) as err:
        check_access(GATED)
    assert str(err.value) == _expected("no_access", GATED, endpoint)
    assert check_access(GATED, "main", Secret(he.GOOD_TOKEN)) == MAIN


def test_the_token_is_never_printed_logged_or_written(endpoint: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture,
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    """Even at DEBUG with HF_DEBUG (which logs each request as a curl command)."""
    hf_logger = logging.getLogger("huggingface_hub")
    monkeypatch.setattr(hf_logger, "propagate", True)
    monkeypatch.setattr(hf_logger, "level", logging.DEBUG)
    monkeypatch.setattr(constants, "HF_DEBUG", True)
    caplog.set_level(logging.DEBUG)
    for token in (he.GOOD_TOKEN, BAD_TOKEN, he.NO_ACCESS_TOKEN):
        for call in (lambda t: check_access(GATED, "main", t, endpoint),
                     lambda t: model_shape(GATED, "next", t, endpoint, tmp_path / "cache")):
            try:
                call(token)
            except HubAccessError as e:
                assert token not in str(e)
    out, err = capfd.readouterr()
    for token in (he.GOOD_TOKEN, BAD_TOKEN, he.NO_ACCESS_TOKEN):
        assert token not in caplog.text and token not in out and token not in err
        for path in tmp_path.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert token.encode() not in path.read_bytes(), path
    assert "(authenticated: True)" in caplog.text  # the client logged requests, not tokens
    assert "authorization: <TOKEN>" in caplog.text


# --- model shape -------------------------------------------------------------------------------


def test_model_shape_of_the_tiny_model(endpoint: str, tmp_path: Path) -> None:
    shape = model_shape(PUBLIC, "main", None, endpoint, tmp_path)
    files = tinymodel.revisions()["main"].files
    weights = files[tinymodel.SAFETENSORS_FILE]
    assert shape == ModelShape(
        model=PUBLIC, commit=MAIN, num_layers=2, hidden_size=128, num_attention_heads=2,
        num_kv_heads=1, head_dim=64, max_position_embeddings=8192, torch_dtype="bfloat16",
        parameters=2_524_544, weight_bytes=weights.size, quantization=None, gated=False, vocab_size=tinymodel.VOCAB_SIZE,
        files=tuple(
            {"path": f.path, "size": f.size, "blob_id": f.blob_id,
             **({"sha256": f.sha256} if f.lfs else {})}
            for f in sorted(files.values(), key=lambda f: f.path) if f.path != ".gitattributes"
        ),
    )
    assert shape.weight_bytes == 5_051_320
    assert next(f for f in shape.files if f["path"] == "model.safetensors")["sha256"] == (
        "c5de1756b8f637e676fead1a58f5375b1f67a5aaae7fff2bbe1dc5e07232475a")
    s = stats(endpoint)
    # config.json: one GET (no HEAD first, and no retries but gpufleet's own)
    assert s["requests_by_kind"] == {"model_info": 1, "resolve_get": 1}
    assert s["bytes_by_file"] == {f"{PUBLIC}/config.json": files["config.json"].size}


def test_model_shape_of_the_gated_model(endpoint: str, tmp_path: Path) -> None:
    shape = model_shape(GATED, "next", he.GOOD_TOKEN, endpoint, tmp_path)
    assert (shape.commit, shape.gated, shape.parameters) == (NEXT, True, 2_524_544)
    next_config = tinymodel.revisions()["next"].files["generation_config.json"]
    assert {"path": "generation_config.json", "size": next_config.size,
            "blob_id": next_config.blob_id} in shape.files
    with pytest.raises(HubAccessError) as err:
        model_shape(GATED, "main", None, endpoint, tmp_path)
    assert str(err.value) == _expected("no_token", GATED, endpoint)


def test_a_pinned_commit_in_the_cache_needs_no_request(endpoint: str, tmp_path: Path) -> None:
    first = model_shape(GATED, MAIN, he.GOOD_TOKEN, endpoint, tmp_path)
    cached = hub.cache_path(tmp_path, endpoint, GATED, MAIN)
    assert cached.parent.name == "models--gpufleet-lab--tiny-llama-gated"
    assert json.loads(cached.read_text())["shape"] == first.to_json()
    reset(endpoint)
    assert model_shape(GATED, MAIN, he.GOOD_TOKEN, endpoint, tmp_path) == first
    assert stats(endpoint)["requests"] == 0
    # a branch must still be resolved: exactly one request, no file
    assert model_shape(GATED, "main", he.GOOD_TOKEN, endpoint, tmp_path) == first
    assert model_shape(GATED, "v1.0", he.GOOD_TOKEN, endpoint, tmp_path) == first
    s = stats(endpoint)
    assert s["requests_by_kind"] == {"model_info": 2} and s["total_bytes"] == 0


def test_the_cache_is_keyed_by_endpoint_model_and_commit(hub_server: Callable[..., HubServer],
                                                         tmp_path: Path) -> None:
    one, two = base_url(hub_server()), base_url(hub_server())
    model_shape(PUBLIC, MAIN, None, one, tmp_path)
    model_shape(PUBLIC, MAIN, None, two, tmp_path)  # another endpoint: asked again
    model_shape(GATED, MAIN, he.GOOD_TOKEN, one, tmp_path)  # another model: asked again
    model_shape(PUBLIC, NEXT, None, one, tmp_path)  # another commit: asked again
    assert stats(one)["requests_by_kind"]["model_info"] == 3
    assert stats(two)["requests_by_kind"]["model_info"] == 1
    assert len(list(tmp_path.rglob("*.json"))) == 4


def test_the_default_cache_is_in_the_state_dir(endpoint: str, tmp_path: Path) -> None:
    model_shape(PUBLIC, "next", None, endpoint)
    assert hub.cache_path(tmp_path / "state" / "hub-cache", endpoint, PUBLIC, NEXT).is_file()


def test_a_damaged_cache_entry_is_read_again(endpoint: str, tmp_path: Path) -> None:
    first = model_shape(PUBLIC, MAIN, None, endpoint, tmp_path)
    path = hub.cache_path(tmp_path, endpoint, PUBLIC, MAIN)
    path.write_text("{not json")
    assert model_shape(PUBLIC, MAIN, None, endpoint, tmp_path) == first
    doc = json.loads(path.read_text())
    doc["shape"]["num_layers"] = "two"
    doc["shape"]["unexpected"] = 1
    path.write_text(json.dumps(doc))
    assert model_shape(PUBLIC, MAIN, None, endpoint, tmp_path) == first
    assert stats(endpoint)["requests_by_kind"]["model_info"] == 3


def test_parameters_from_the_safetensors_headers_when_the_hub_has_no_totals(
        hub_server: Callable[..., HubServer], tmp_path: Path) -> None:
    endpoint = base_url(hub_server(api_safetensors=False))
    shape = model_shape(PUBLIC, "main", None, endpoint, tmp_path)
    assert (shape.parameters, shape.torch_dtype) == (2_524_544, "bfloat16")
    s = stats(endpoint)
    assert s["bytes_by_file"][f"{PUBLIC}/model.safetensors"] == 100_001  # header range only


def test_model_shape_of_an_unknown_model_or_revision(endpoint: str, tmp_path: Path) -> None:
    with pytest.raises(HubAccessError, match="was not found"):
        model_shape("gpufleet-lab/nope", "main", None, endpoint, tmp_path)
    with pytest.raises(HubAccessError) as err:
        model_shape(PUBLIC, "1" * 40, None, endpoint, tmp_path)
    assert str(err.value) == hub.msg_revision_not_found(PUBLIC, "1" * 40, endpoint)


# --- pure parts ------------------------------------------------------------------------------------


def _sib(name: str, size: int = 10, lfs: bool = False) -> dict[str, Any]:
    return {"rfilename": name, "size": size, "blobId": "b" * 40,
            "lfs": {"sha256": "s" * 64, "size": size} if lfs else None}


def test_staged_files_skip_duplicates_other_formats_and_subfolders() -> None:
    siblings = [
        _sib(".gitattributes"), _sib("config.json"), _sib("generation_config.json"),
        _sib("tokenizer.json"), _sib("tokenizer_config.json"), _sib("README.md"),
        _sib("model-00001-of-00002.safetensors", 100, True),
        _sib("model-00002-of-00002.safetensors", 50, True),
        _sib("model.safetensors.index.json"),
        _sib("consolidated.safetensors", 150, True),  # Mistral's duplicate
        _sib("pytorch_model.bin", 150, True), _sib("pytorch_model.bin.index.json"),
        _sib("original/consolidated.00.pth", 150, True), _sib("original/params.json"),
        _sib("model.gguf", 70, True), _sib("onnx/model.onnx", 70, True),
    ]
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors",
                            "b": "model-00002-of-00002.safetensors"}}
    staged = staged_files(siblings, index)
    assert [f["path"] for f in staged] == [
        "README.md", "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json",
        "tokenizer_config.json"]
    assert sum(f["size"] for f in hub.weight_files(staged)) == 150
    assert staged[3]["sha256"] == "s" * 64 and "sha256" not in staged[0]
    # without the index, every top-level safetensors file is a weight file
    assert "consolidated.safetensors" in [f["path"] for f in staged_files(siblings)]
    # .bin only: the .bin files and their index
    bins = staged_files([_sib("config.json"), _sib("pytorch_model.bin", 9, True),
                         _sib("pytorch_model.bin.index.json"), _sib("tf_model.h5", 9, True)])
    assert [f["path"] for f in bins] == ["config.json", "pytorch_model.bin",
                                         "pytorch_model.bin.index.json"]


BASE = {"num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
        "max_position_embeddings": 8192}


@pytest.mark.parametrize("config, expected", [
    (dict(BASE, num_key_value_heads=8, torch_dtype="bfloat16"), (8, 128, "bfloat16", None)),
    (dict(BASE, dtype="float16"), (32, 128, "float16", None)),  # kv heads default to heads
    (dict(BASE, head_dim=256, num_key_value_heads=4, torch_dtype="bfloat16",
          quantization_config={"quant_method": "fp8", "activation_scheme": "dynamic"}),
     (4, 256, "bfloat16", "fp8")),
    (dict(BASE, head_dim=None, quantization_config={"quant_method": "awq", "bits": 4}),
     (32, 128, "float16", "awq")),  # no dtype: from the weights
    ({"architectures": ["Llama4ForConditionalGeneration"], "torch_dtype": "bfloat16",
      "text_config": dict(BASE, num_key_value_heads=8, head_dim=128)},
     (8, 128, "bfloat16", None)),
])
def test_shape_from_config(config: dict[str, Any], expected: tuple[Any, ...]) -> None:
    shape = shape_from_config("org/m", "a" * 40, config, parameters=8_030_261_248,
                              weight_bytes=16_060_522_496, weight_dtype="float16")
    assert (shape.num_kv_heads, shape.head_dim, shape.torch_dtype, shape.quantization) == expected
    assert (shape.num_layers, shape.hidden_size, shape.max_position_embeddings) == (32, 4096, 8192)


def test_shape_from_config_refuses_a_config_without_the_numbers() -> None:
    with pytest.raises(HubModelError, match="config.json of org/m has no usable "
                                            "'max_position_embeddings'"):
        shape_from_config("org/m", "a" * 40, {k: v for k, v in BASE.items()
                                              if k != "max_position_embeddings"},
                          parameters=1, weight_bytes=1)
