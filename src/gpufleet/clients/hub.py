"""The model, as the Hugging Face Hub describes it, read on the controller before any host changes.

Uses the real ``huggingface_hub`` client (``HfApi(endpoint=..., token=...)``), against
``https://huggingface.co`` or any Hub-compatible endpoint (``HF_ENDPOINT``; the lab's emulator).

* ``resolve_revision``: a branch or tag -> the 40-hex commit it points to now (one request); a
  40-hex commit is kept as is, after checking that it exists (one request).
* ``check_access``: before any host changes, can this token download this model's files? A public
  model needs no token. Every failure is ONE ``HubAccessError`` whose message says what to do:
  gated model without a token, token without access (licence not accepted, request pending,
  fine-grained token without the gated-repos permission), invalid token, unknown model or
  revision, unreachable endpoint. No message ever contains the token. Returns the commit.
  Requests: one (model info), plus one ``HEAD`` of ``config.json`` for a gated model; no file
  bytes.
* ``model_shape``: config.json (layers, hidden size, attention and KV heads, head dim, max position
  embeddings, dtype, quantization method) + parameter count and weight bytes (safetensors
  metadata) + the files to stage with their sizes, git blob ids and, for LFS files, sha256 ->
  ``ModelShape``. Cached as JSON under ``cache_dir`` (default
  ``<GPUFLEET_STATE_DIR or ~/.config/gpufleet>/hub-cache/``) keyed by (endpoint, model, commit):
  with a pinned commit a re-run makes NO request; a branch or tag still needs one request (the
  model info that resolves it) and then reads the cache. On a miss: model info with file metadata
  (1), config.json (GET, 1), model.safetensors.index.json when the checkpoint is sharded
  (1 more), and, only when the Hub's model info has no safetensors totals, the safetensors
  headers (``get_safetensors_metadata``, range requests of the headers only).

The cache skips the access check by design: call ``check_access`` on every deploy.

Retries: a transient failure (no answer, a cut connection, a timeout, HTTP 429, 500, 502, 503,
504) repeats the whole call, up to ``Retry.attempts`` (4) times in all, waiting 1 s, 2 s, 4 s
between them (a 429's ``Retry-After``, at most 30 s, when it says more); then it fails with one
``HubAccessError`` that says what failed and how often it was tried. 401, 403, 404 and every other
answer are never retried. ``retry=`` (a ``Retry``) changes this per call, e.g. in tests.

Tokens: ``token=None`` reads ``HF_TOKEN`` (then ``HUGGING_FACE_HUB_TOKEN``); ``token=""`` means
anonymous even when ``HF_TOKEN`` is set. The token is always passed to ``huggingface_hub``
explicitly (a string, or ``False`` for none), so the client never falls back to a token file, never
refreshes or writes one, and never logs it (it logs only whether a request was authenticated).
``endpoint=None`` reads ``HF_ENDPOINT`` (default ``https://huggingface.co``).

Files staged on the hosts (``ModelShape.files``): the top-level files vLLM reads. Weights: the
``*.safetensors`` files (only those named in ``model.safetensors.index.json`` when there is one,
so that e.g. Mistral's duplicate ``consolidated.safetensors`` is not downloaded), else the
PyTorch ``*.bin`` files. Never: ``.gitattributes``, sub-folders (e.g. Meta's ``original/``
checkpoint, which would double the bytes), other weight formats (gguf, onnx, h5, msgpack...). Each
entry: ``path``, ``size``, ``blob_id`` (git) and ``sha256`` for LFS files; the file's name in
the HF cache's ``blobs/`` is its ``sha256`` if it has one, else its ``blob_id``, and the bytes
come from ``{endpoint}/{model}/resolve/{commit}/{path}``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pyinfra.api.exceptions import PyinfraError

from gpufleet import __version__
from gpufleet.clients.digitalocean import retry_after_seconds
from gpufleet.model.model_shape import ModelShape
from gpufleet.model.secrets import Secret, state_dir

DEFAULT_ENDPOINT = "https://huggingface.co"
TIMEOUT_S = 20.0
CACHE_VERSION = 1
TOKEN_PERMISSION = (
    "'Read access to contents of all public gated repos you can access' (fine-grained) "
    "or the read role"
)

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf",
                    ".onnx", ".ot", ".tflite", ".npz")
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_BIN_INDEX = "pytorch_model.bin.index.json"
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "int8": 1}
_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
_T = TypeVar("_T")


@dataclass(frozen=True)
class Retry:
    """How a Hub call retries transient failures: ``attempts`` tries in all, waiting
    ``backoff_s``, then twice as long each time (at most ``max_backoff_s``); after a 429 its
    ``Retry-After`` when longer, at most ``max_retry_after_s``. ``sleep`` and ``clock`` are
    injectable for tests."""

    attempts: int = 4
    backoff_s: float = 1.0
    max_backoff_s: float = 8.0
    max_retry_after_s: float = 30.0
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.time

    def wait(self, retry_number: int, retry_after: float | None = None) -> float:
        """Seconds before retry ``retry_number`` (1, 2, ...)."""
        wait = min(self.backoff_s * 2 ** (retry_number - 1), self.max_backoff_s)
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_retry_after_s))
        return wait


DEFAULT_RETRY = Retry()


class HubError(PyinfraError):
    """The Hub could not tell gpufleet what it needs about a model; the message says why."""


class HubAccessError(HubError):
    """The model cannot be read with this token from this endpoint; the message says what to do
    and never contains the token."""


class HubModelError(HubError):
    """The model's files do not describe a model gpufleet can plan for (config.json unusable)."""


# --------------------------------------------------------------------------------------------
# Endpoint, token
# --------------------------------------------------------------------------------------------


def hub_endpoint(endpoint: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """``endpoint``, else ``HF_ENDPOINT``, else https://huggingface.co (no trailing slash)."""
    env = os.environ if environ is None else environ
    return (endpoint or env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_token(token: str | Secret | None = None,
              environ: Mapping[str, str] | None = None) -> str | None:
    """``token`` ("" = anonymous), else ``HF_TOKEN`` / ``HUGGING_FACE_HUB_TOKEN``; None: no token."""
    if isinstance(token, Secret):
        token = token.reveal()
    if token is None:
        env = os.environ if environ is None else environ
        token = env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or ""
    token = token.strip()
    return token or None


def is_commit(revision: str) -> bool:
    return bool(_COMMIT.match(revision))


def model_page(model: str, endpoint: str) -> str:
    """The model's page, where a gated model's access is requested (the Hub serves its web pages
    and its API on the same host)."""
    return f"{endpoint}/{model}"


# --------------------------------------------------------------------------------------------
# Messages (one per failure; none mentions the token's value)
# --------------------------------------------------------------------------------------------


def msg_gated_no_token(model: str, endpoint: str = DEFAULT_ENDPOINT) -> str:
    return (f"{model} is gated: set HF_TOKEN to a token of an account that accepted the licence "
            f"at {model_page(model, endpoint)}; the token needs {TOKEN_PERMISSION}")


def msg_gated_no_access(model: str, endpoint: str = DEFAULT_ENDPOINT) -> str:
    return (f"{model} is gated and the account of HF_TOKEN has no access to it (licence not "
            f"accepted): log in as that account and request access at "
            f"{model_page(model, endpoint)}, then deploy again; the token needs "
            f"{TOKEN_PERMISSION}")


def msg_gated_pending(model: str, endpoint: str = DEFAULT_ENDPOINT) -> str:
    return (f"{model} is gated and the access request of HF_TOKEN's account is awaiting review "
            f"by the model's authors: deploy again once {model_page(model, endpoint)} shows "
            "that access was granted")


def msg_gated_token_scope(model: str, endpoint: str = DEFAULT_ENDPOINT) -> str:
    return (f"{model} is gated and HF_TOKEN is a fine-grained token without 'Read access to "
            f"contents of all public gated repos you can access': enable it at "
            f"{endpoint}/settings/tokens (or use a token with the read role); access to the "
            f"model itself is requested at {model_page(model, endpoint)}")


def msg_invalid_token(model: str, endpoint: str = DEFAULT_ENDPOINT) -> str:
    return (f"HF_TOKEN was rejected by {endpoint} (invalid, expired or revoked token) while "
            f"reading {model}: create a token at {endpoint}/settings/tokens with "
            f"{TOKEN_PERMISSION}; for a public model, `export HF_TOKEN=` deploys without one")


def msg_model_not_found(model: str, endpoint: str = DEFAULT_ENDPOINT,
                        has_token: bool = False) -> str:
    hint = ("if it is private, the account of HF_TOKEN cannot read it" if has_token else
            "if it is private, set HF_TOKEN to a token of an account that can read it")
    return (f"{model} was not found on {endpoint}: check the model id in the spec "
            f"(organisation/name, as in {model_page(model, endpoint)}); {hint}")


def msg_revision_not_found(model: str, revision: str, endpoint: str = DEFAULT_ENDPOINT) -> str:
    return (f"revision '{revision}' of {model} was not found on {endpoint}: use a branch, a tag "
            f"or a full 40-character commit id of the repository "
            f"({model_page(model, endpoint)}/commits/main lists the commits of main)")


def _tried(tries: int) -> str:
    return f"tried {tries} times" if tries > 1 else "tried once"


def msg_unreachable(model: str, endpoint: str, reason: str, tries: int = 1) -> str:
    return (f"cannot reach the Hugging Face Hub at {endpoint} to read {model} ({reason}; "
            f"{_tried(tries)}): check the controller's network and proxy settings, or "
            "HF_ENDPOINT")


def msg_offline(model: str, endpoint: str) -> str:
    return (f"HF_HUB_OFFLINE is set on the controller, so {model} cannot be read from "
            f"{endpoint}: unset it (a pinned commit already in gpufleet's hub cache needs no "
            "request)")


# --------------------------------------------------------------------------------------------
# Errors from huggingface_hub -> one HubAccessError
# --------------------------------------------------------------------------------------------


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "*****") if token else text


def _unwrap(err: BaseException) -> BaseException:
    from huggingface_hub.errors import LocalEntryNotFoundError

    if isinstance(err, LocalEntryNotFoundError) and err.__cause__ is not None:
        return err.__cause__  # hf_hub_download: the HEAD call's error is the cause
    return err


def _transient(err: BaseException, clock: Callable[[], float] = time.time
               ) -> tuple[bool, float | None]:
    """(whether ``err`` may heal on a retry, the server's Retry-After in seconds)."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    err = _unwrap(err)
    if isinstance(err, HfHubHTTPError):
        response = err.response
        status = response.status_code
        if status not in TRANSIENT_STATUSES:
            return False, None
        after = retry_after_seconds(response.headers, clock()) if status == 429 else None
        return True, after
    return isinstance(err, httpx2.TransportError | ConnectionError | TimeoutError), None


def _explain(err: BaseException, model: str, revision: str, endpoint: str,
             token: str | None, tries: int = 1) -> HubError:
    """One clear error for anything the client raised (never with the token in it); ``tries``:
    how often a transient failure was tried."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    has_token = token is not None
    if isinstance(err, LocalEntryNotFoundError) and err.__cause__ is not None:
        err = err.__cause__  # hf_hub_download: the HEAD call's error is the cause
    message: str
    transient = _transient(err)[0]
    if isinstance(err, GatedRepoError):
        status = err.response.status_code
        server = (err.server_message or "").lower()
        if status == 401:
            message = (msg_invalid_token(model, endpoint) if has_token
                       else msg_gated_no_token(model, endpoint))
        elif "awaiting a review" in server:
            message = msg_gated_pending(model, endpoint)
        elif "fine-grained" in server:
            message = msg_gated_token_scope(model, endpoint)
        else:
            message = msg_gated_no_access(model, endpoint)
    elif isinstance(err, RevisionNotFoundError):
        message = msg_revision_not_found(model, revision, endpoint)
    elif isinstance(err, RepositoryNotFoundError):
        message = msg_model_not_found(model, endpoint, has_token)
    elif isinstance(err, RemoteEntryNotFoundError):
        url = str(err.response.url)
        name = url.rsplit("/", 1)[-1]
        return HubModelError(_redact(
            f"{model} at {revision} has no {name}: gpufleet (and vLLM) need a checkpoint in the "
            "transformers format (config.json, safetensors or .bin weights)", token))
    elif isinstance(err, HfHubHTTPError):
        status = err.response.status_code
        if status == 401:
            message = (msg_invalid_token(model, endpoint) if has_token
                       else msg_model_not_found(model, endpoint, has_token))
        else:
            detail = err.server_message or err.response.reason_phrase or "no detail"
            detail = " ".join(detail.split())
            message = (f"the Hugging Face Hub at {endpoint} answered HTTP {status} for {model}: "
                       f"{detail}")
            if transient:
                request = err.response.request
                message = (f"the Hugging Face Hub at {endpoint} answered HTTP {status} for {model} "
                           f"({request.method} {request.url.path}; {_tried(tries)}): {detail}")
            if status == 403:
                message += f"; the token needs {TOKEN_PERMISSION}"
            elif status == 429:
                message += "; wait a minute and deploy again"
            elif transient:
                message += "; the Hub is having trouble: deploy again later"
    elif isinstance(err, OfflineModeIsEnabled):
        message = msg_offline(model, endpoint)
    elif isinstance(err, HFValidationError):
        message = (f"'{model}' is not a valid Hugging Face model id (organisation/name): "
                   f"{' '.join(str(err).split())}")
    elif isinstance(err, httpx2.TransportError | ConnectionError | TimeoutError):
        reason = type(err).__name__
        detail = " ".join(str(err).split())
        if detail:
            reason = f"{reason}: {detail}"
        message = msg_unreachable(model, endpoint, reason, tries)
    else:
        message = (f"reading {model} from {endpoint} failed: {type(err).__name__}: "
                   f"{' '.join(str(err).split())}")
    return HubAccessError(_redact(message, token))


def _hub_call(call: Callable[[], _T], model: str, revision: str, endpoint: str,
              token: str | None, retry: Retry | None = None) -> _T:
    """``call()``, repeated on transient failures (see ``Retry``); any failure of the client
    becomes one ``HubError`` (a ``HubError`` raised by ``call`` passes through)."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled

    retry = retry or DEFAULT_RETRY
    tries = 0
    while True:
        tries += 1
        try:
            return call()
        except HubError:
            raise
        except (HfHubHTTPError, HFValidationError, OfflineModeIsEnabled, httpx2.TransportError,
                OSError) as err:
            transient, after = _transient(err, retry.clock)
            if not transient or tries >= retry.attempts:
                raise _explain(err, model, revision, endpoint, token, tries) from None
            retry.sleep(retry.wait(tries, after))


def _api(endpoint: str, token: str | None) -> Any:
    from huggingface_hub import HfApi

    # token=False: never the implicit token (file, OIDC, Colab), never a token refresh/write
    return HfApi(endpoint=endpoint, token=token if token else False, library_name="gpufleet",
                 library_version=__version__)


# --------------------------------------------------------------------------------------------
# Revision and access
# --------------------------------------------------------------------------------------------


def resolve_revision(model: str, revision: str = "main", token: str | Secret | None = None,
                     endpoint: str | None = None, retry: Retry | None = None) -> str:
    """The 40-hex commit ``revision`` (branch, tag or commit) designates now. A commit id is
    returned as is once the Hub confirmed it exists. One request (more on transient failures,
    see ``Retry``)."""
    endpoint = hub_endpoint(endpoint)
    tok = hub_token(token)
    info = _hub_call(lambda: _api(endpoint, tok).model_info(model, revision=revision,
                                                            expand=["sha"], timeout=TIMEOUT_S),
                     model, revision, endpoint, tok, retry)
    return _commit_of(info, model, revision, endpoint)


def _commit_of(info: Any, model: str, revision: str, endpoint: str) -> str:
    sha = getattr(info, "sha", None)
    if not isinstance(sha, str) or not is_commit(sha):
        raise HubAccessError(f"{endpoint} answered for {model} at '{revision}' without a commit "
                             "id: is HF_ENDPOINT a Hugging Face Hub?")
    if is_commit(revision) and sha != revision:
        raise HubAccessError(f"{endpoint} resolved commit {revision} of {model} to {sha}")
    return sha


def check_access(model: str, revision: str = "main", token: str | Secret | None = None,
                 endpoint: str | None = None, retry: Retry | None = None) -> str:
    """Raise ``HubAccessError`` unless the files of ``model`` at ``revision`` can be downloaded
    with ``token`` (a public model needs none). Returns the resolved commit. Transient failures
    are retried (see ``Retry``)."""
    endpoint = hub_endpoint(endpoint)
    tok = hub_token(token)
    return _hub_call(lambda: _check_access(model, revision, endpoint, tok), model, revision,
                     endpoint, tok, retry)


def _check_access(model: str, revision: str, endpoint: str, tok: str | None) -> str:
    """One attempt of check_access."""
    info = _api(endpoint, tok).model_info(model, revision=revision,
                                          expand=["sha", "gated", "private"],
                                          timeout=TIMEOUT_S)
    commit = _commit_of(info, model, revision, endpoint)
    if getattr(info, "gated", False):
        # the model info of a gated model is public: only its files tell whether we may
        # download them (401/403 GatedRepo). HEAD: headers only, no bytes.
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        url = hf_hub_url(model, "config.json", revision=commit, endpoint=endpoint)
        get_hf_file_metadata(url, token=tok if tok else False, timeout=TIMEOUT_S,
                             endpoint=endpoint, library_name="gpufleet",
                             library_version=__version__)
    return commit


# --------------------------------------------------------------------------------------------
# Model shape
# --------------------------------------------------------------------------------------------


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    return state_dir(os.environ if environ is None else environ) / "hub-cache"


def cache_path(cache_dir: Path, endpoint: str, model: str, commit: str) -> Path:
    """``<cache_dir>/models--<org>--<name>/<commit>-<hash of endpoint>.json``."""
    tag = hashlib.sha256(endpoint.encode()).hexdigest()[:12]
    return cache_dir / ("models--" + model.replace("/", "--")) / f"{commit}-{tag}.json"


def _cache_read(path: Path, endpoint: str, model: str, commit: str) -> ModelShape | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if (doc.get("version"), doc.get("endpoint"), doc.get("model"), doc.get("commit")) != (
                CACHE_VERSION, endpoint, model, commit):
            return None
        shape = ModelShape.from_json(doc["shape"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None  # missing or unreadable: read the Hub again
    return shape if shape.commit == commit and shape.model == model else None


def _cache_write(path: Path, endpoint: str, shape: ModelShape) -> None:
    doc = {"version": CACHE_VERSION, "endpoint": endpoint, "model": shape.model,
           "commit": shape.commit, "shape": shape.to_json()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError, UnboundLocalError):
            os.unlink(tmp)  # the cache is an optimisation: a read-only state dir is no error


def staged_files(siblings: Iterable[Mapping[str, Any]],
                 safetensors_index: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """The files the hosts stage, from the model info's siblings (``rfilename``, ``size``,
    ``blobId``, ``lfs``: {``sha256``, ``size``}); see the module docstring for the rules."""
    top = [s for s in siblings if "/" not in s["rfilename"] and s["rfilename"] != ".gitattributes"]
    names = {s["rfilename"] for s in top}
    safetensors = {n for n in names if n.endswith(".safetensors")}
    if safetensors and safetensors_index is not None:
        listed = set((safetensors_index.get("weight_map") or {}).values())
        if listed and listed <= safetensors:
            safetensors = listed
    if safetensors:
        weights, keep_index = safetensors, _SAFETENSORS_INDEX
    else:
        weights, keep_index = {n for n in names if n.endswith(".bin")}, _BIN_INDEX
    files: list[dict[str, Any]] = []
    for s in sorted(top, key=lambda s: s["rfilename"]):
        name = s["rfilename"]
        if name.endswith(_WEIGHT_SUFFIXES) and name not in weights:
            continue  # another weight format, or weights the index does not use
        if name in (_SAFETENSORS_INDEX, _BIN_INDEX) and name != keep_index:
            continue
        entry: dict[str, Any] = {"path": name, "size": s.get("size"), "blob_id": s.get("blobId")}
        lfs = s.get("lfs")
        if lfs:
            entry["sha256"] = lfs["sha256"]
        files.append(entry)
    return files


def weight_files(files: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [f for f in files if f["path"].endswith((".safetensors", ".bin"))]


def _int(config: Mapping[str, Any], key: str, model: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise HubModelError(f"config.json of {model} has no usable '{key}' (found {value!r}); "
                            "gpufleet cannot plan memory for it")
    return value


def shape_from_config(model: str, commit: str, config: Mapping[str, Any], *, parameters: int,
                      weight_bytes: int, files: Iterable[Mapping[str, Any]] = (),
                      gated: bool = False, weight_dtype: str | None = None) -> ModelShape:
    """Pure: a ModelShape from config.json's content and the checkpoint's totals. Reads a
    multimodal model's ``text_config`` when the language model's keys are there."""
    text = config
    nested = config.get("text_config")
    if "num_hidden_layers" not in config and isinstance(nested, Mapping):
        text = nested
    layers = _int(text, "num_hidden_layers", model)
    hidden = _int(text, "hidden_size", model)
    heads = _int(text, "num_attention_heads", model)
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or hidden // heads
    max_pos = _int(text, "max_position_embeddings", model)
    dtype = (config.get("torch_dtype") or config.get("dtype") or text.get("torch_dtype")
             or text.get("dtype") or weight_dtype or "float32")
    quant = config.get("quantization_config") or text.get("quantization_config")
    method = quant.get("quant_method") if isinstance(quant, Mapping) else None
    return ModelShape(
        model=model,
        commit=commit,
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        max_position_embeddings=max_pos,
        torch_dtype=str(dtype),
        parameters=int(parameters),
        weight_bytes=int(weight_bytes),
        quantization=str(method) if method else None,
        files=tuple(dict(f) for f in files),
        gated=bool(gated),
        vocab_size=int(text["vocab_size"]) if text.get("vocab_size") else None,
        tie_word_embeddings=bool(text.get("tie_word_embeddings", config.get(
            "tie_word_embeddings", False))),
    )


def _read_json_file(model: str, commit: str, filename: str, endpoint: str,
                    token: str | None) -> Any:
    """One GET of a small JSON file at ``commit``, with huggingface_hub's session and its error
    mapping, but none of ``hf_hub_download``'s own retries: ``_hub_call`` is the one retry
    policy (hf_hub_download would repeat a failing HEAD five more times with its own backoff)."""
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.errors import OfflineModeIsEnabled
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    if constants.HF_HUB_OFFLINE:
        raise OfflineModeIsEnabled(f"cannot read {filename}: HF_HUB_OFFLINE is set")
    url = hf_hub_url(model, filename, revision=commit, endpoint=endpoint)
    headers = build_hf_headers(token=token if token else False, library_name="gpufleet",
                               library_version=__version__)
    response = get_session().get(url, headers=headers, timeout=TIMEOUT_S, follow_redirects=True)
    hf_raise_for_status(response)
    try:
        return json.loads(response.content.decode("utf-8"))
    except ValueError as e:
        raise HubModelError(f"{filename} of {model} at {commit} is not valid JSON: {e}") from None


def model_shape(model: str, revision: str = "main", token: str | Secret | None = None,
                endpoint: str | None = None, cache_dir: str | os.PathLike[str] | None = None,
                retry: Retry | None = None) -> ModelShape:
    """What the planner needs about ``model`` at ``revision``, from the Hub or from the cache.

    A pinned 40-hex commit already in the cache: no request. A branch or tag: one request (it
    must be resolved), then the cache. Transient failures are retried (see ``Retry``). Errors:
    ``HubAccessError`` (same messages as ``check_access``), ``HubModelError`` (config.json
    unusable)."""
    endpoint = hub_endpoint(endpoint)
    tok = hub_token(token)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if is_commit(revision):
        hit = _cache_read(cache_path(cache, endpoint, model, revision), endpoint, model, revision)
        if hit is not None:
            return hit
    return _hub_call(lambda: _fetch_shape(model, revision, endpoint, tok, cache), model,
                     revision, endpoint, tok, retry)


def _fetch_shape(model: str, revision: str, endpoint: str, tok: str | None,
                 cache: Path) -> ModelShape:
    """One attempt of model_shape's requests (after the cache missed a pinned commit)."""
    api = _api(endpoint, tok)
    info = api.model_info(model, revision=revision, files_metadata=True, timeout=TIMEOUT_S)
    commit = _commit_of(info, model, revision, endpoint)
    path = cache_path(cache, endpoint, model, commit)
    if not is_commit(revision):
        hit = _cache_read(path, endpoint, model, commit)
        if hit is not None:
            return hit
    siblings = [
        {"rfilename": s.rfilename, "size": s.size, "blobId": s.blob_id,
         "lfs": {"sha256": s.lfs.sha256, "size": s.lfs.size} if s.lfs else None}
        for s in (info.siblings or [])
    ]
    names = {s["rfilename"] for s in siblings}
    config = _read_json_file(model, commit, "config.json", endpoint, tok)
    index = (_read_json_file(model, commit, _SAFETENSORS_INDEX, endpoint, tok)
             if _SAFETENSORS_INDEX in names else None)
    if not isinstance(config, dict):
        raise HubModelError(f"config.json of {model} at {commit} is not a JSON object")
    files = staged_files(siblings, index if isinstance(index, dict) else None)
    weights = weight_files(files)
    if not weights:
        raise HubModelError(f"{model} at {commit} has no safetensors or .bin weights at the "
                            "top of the repository; vLLM cannot load it from there")
    if any(f["size"] is None for f in files):
        raise HubAccessError(f"{endpoint} gave no file sizes for {model} (model info with "
                             "blobs=true): is HF_ENDPOINT a Hugging Face Hub?")
    weight_bytes = sum(int(f["size"]) for f in weights)
    weight_dtype = None
    if info.safetensors is not None:
        parameters = int(info.safetensors.total)
        weight_dtype = _dominant_dtype(info.safetensors.parameters)
    elif weights[0]["path"].endswith(".safetensors"):
        meta = api.get_safetensors_metadata(model, revision=commit,
                                            token=tok if tok else False)
        counts = dict(meta.parameter_count)
        parameters = sum(counts.values())
        weight_dtype = _dominant_dtype(counts)
    else:  # .bin only: estimated from the bytes and the declared dtype
        dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
        parameters = weight_bytes // _DTYPE_BYTES.get(dtype, 2)
    shape = shape_from_config(model, commit, config, parameters=parameters,
                              weight_bytes=weight_bytes, files=files,
                              gated=bool(info.gated), weight_dtype=weight_dtype)
    _cache_write(path, endpoint, shape)
    return shape


def _dominant_dtype(counts: Mapping[str, int]) -> str | None:
    if not counts:
        return None
    dtype = max(counts.items(), key=lambda kv: kv[1])[0]
    return _SAFETENSORS_DTYPES.get(dtype)
