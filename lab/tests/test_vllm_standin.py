"""Tests of the `vllm serve` stand-in (lab/src/gpufleet_lab/vllm_standin.py).

The server runs as a real subprocess (signals, exit codes, stdout logs) on 127.0.0.1 with a
kernel-chosen port, read back from its "Starting vLLM server on" log line. What it shares with
the real vLLM is checked against the real server in test_vllm_contract.py.
"""

from __future__ import annotations

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
from pathlib import Path
from typing import Any

import pytest

from gpufleet.model.vllm_version import PINNED_VERSION
from gpufleet_lab import vllm_standin as v

STANDIN = Path(v.__file__)
MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
KEY = "lab-secret"
READY = re.compile(r"Starting vLLM server on http://([\d.]+):(\d+)")


class Standin:
    """One stand-in process with its log file."""

    def __init__(self, tmp: Path, args: list[str], env: dict[str, str] | None = None) -> None:
        self.log_path = tmp / f"standin-{time.monotonic_ns()}.log"
        full_env = {k: val for k, val in os.environ.items()
                    if not k.startswith(("VLLM_", "HF_"))}
        full_env.update({"VLLM_STANDIN_COLD_START_S": "0.2", "VLLM_STANDIN_TOKENS_PER_S": "2000"})
        full_env.update(env or {})
        self.log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen([sys.executable, str(STANDIN), *args], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=full_env)
        self.port = 0

    def output(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 10) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = READY.search(self.output())
            if m:
                self.port = int(m.group(2))
                return self.port
            if self.proc.poll() is not None:
                raise AssertionError(f"stand-in exited {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.02)
        raise AssertionError("stand-in did not become ready:\n" + self.output())

    def wait_exit(self, timeout: float = 10) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def request(self, method: str, path: str, body: Any = None, key: str | None = KEY,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        hdrs = dict(headers or {})
        if key:
            hdrs["Authorization"] = f"Bearer {key}"
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        payload = resp.read()
        conn.close()
        return resp.status, {k.lower(): val for k, val in resp.getheaders()}, payload


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Standin]:
    s = Standin(tmp_path_factory.mktemp("vllm"), [
        "serve", "--model", MODEL, "--host", "127.0.0.1", "--port", "0",
        "--served-model-name", "llama3", "--api-key", KEY, "--max-num-seqs", "4",
        "--gpu-memory-utilization", "0.9", "--enable-prefix-caching"])
    try:
        s.wait_ready()
        yield s
    finally:
        assert s.stop() == 0


@pytest.fixture()
def run(tmp_path: Path) -> Iterator[Any]:
    started: list[Standin] = []

    def start(args: list[str], env: dict[str, str] | None = None) -> Standin:
        s = Standin(tmp_path, args, env)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(STANDIN), *argv], capture_output=True, text=True,
                          timeout=30)


# --------------------------------------------------------------------------- CLI

def test_unknown_flag_is_rejected_like_vllm() -> None:
    proc = cli("serve", "--model", MODEL, "--max-num-sequence", "8")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("usage: vllm [-h] [-v]")
    assert "{chat,complete,serve,launch,bench,collect-env,download-kernels,preload,run-batch," \
        "snapshot}" in proc.stderr
    assert lines[-1] == "vllm: error: unrecognized arguments: --max-num-sequence 8"
    assert proc.stdout == ""


def test_unambiguous_abbreviations_are_taken_like_vllm() -> None:
    # vLLM 0.32's serve parser takes "--max-num-seq" for --max-num-seqs (argparse's default)
    ns, _ = v.parse_cli(["serve", MODEL, "--max-num-seq", "8"])
    assert ns.max_num_seqs == 8
    proc = cli("serve", MODEL, "--max-num", "8")
    assert proc.returncode == 2
    assert "vllm serve: error: ambiguous option: --max-num could match" in proc.stderr


def test_invalid_choice_is_reported_by_the_serve_parser() -> None:
    proc = cli("serve", MODEL, "--dtype", "fp7")
    assert proc.returncode == 2
    assert "vllm serve: error: argument --dtype: invalid choice: 'fp7'" in proc.stderr
    proc = cli("serve", MODEL, "--kv-cache-dtype", "int4")
    assert "argument --kv-cache-dtype: invalid choice" in proc.stderr


def test_double_serve_is_an_error_like_in_docker_issue_reports() -> None:
    # ENTRYPOINT is already `vllm serve`; passing `serve MODEL` again makes "serve" the model
    proc = cli("serve", "serve", MODEL)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(f"vllm: error: unrecognized arguments: {MODEL}")


def test_version_flag() -> None:
    proc = cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == str(PINNED_VERSION)
    proc = subprocess.run([sys.executable, str(STANDIN), "--version"], capture_output=True,
                          text=True, env={**os.environ, "VLLM_STANDIN_VERSION": "0.10.2"})
    assert proc.stdout.strip() == "0.10.2"


def test_parse_model_option_becomes_positional_with_warning() -> None:
    ns, warnings = v.parse_cli(["serve", "--model", MODEL, "--max_model_len", "32k", "-tp", "2",
                                "--no-enable-prefix-caching", "--served-model-name", "a", "b",
                                "--api-key", "k1", "k2", "--dtype", "bfloat16",
                                "--kv-cache-dtype", "fp8", "-q", "fp8",
                                "--gpu-memory-utilization", "0.85", "--max-num-batched-tokens",
                                "8K", "--pipeline-parallel-size", "1",
                                "--download-dir", "/models", "--enforce-eager",
                                "--trust-remote-code", "--revision", "main", "--tokenizer", MODEL,
                                "--load-format", "safetensors", "--no-enable-log-requests",
                                "--uvicorn-log-level", "warning", "--generation-config", "vllm",
                                "--seed", "7", "--max-num-seqs", "64"])
    assert ns.model == MODEL and ns.model_tag == MODEL
    assert ns.max_model_len == 32000 and ns.max_num_batched_tokens == 8192
    assert ns.tensor_parallel_size == 2 and ns.enable_prefix_caching is False
    assert ns.served_model_name == ["a", "b"] and ns.api_key == ["k1", "k2"]
    assert (ns.dtype, ns.kv_cache_dtype, ns.quantization) == ("bfloat16", "fp8", "fp8")
    assert ns.enforce_eager is True and ns.trust_remote_code is True and ns.seed == 7
    assert any("--model" in w and "future version" in w for w in warnings)


def test_positional_model_and_defaults() -> None:
    ns, warnings = v.parse_cli(["serve", MODEL])
    assert ns.model == MODEL and warnings == []
    assert ns.port == 8000 and ns.host is None and ns.gpu_memory_utilization == 0.92
    assert ns.enable_prefix_caching is None and ns.tensor_parallel_size == 1


@pytest.mark.parametrize(("text", "value"), [("1k", 1000), ("1K", 1024), ("25.6k", 25600),
                                             ("4096", 4096), ("2M", 2 * 2**20)])
def test_human_readable_int(text: str, value: int) -> None:
    assert v.human_readable_int(text) == value


def test_quantization_is_not_checked_by_the_parser() -> None:
    """vLLM 0.32's parser takes any --quantization (its config checks the method later)."""
    ns, _ = v.parse_cli(["serve", MODEL, "--quantization", "awq4"])
    assert ns.quantization == "awq4"


def test_optimization_level_spellings() -> None:
    for args in (["-O3"], ["-O=3"], ["-O", "3"], ["--optimization-level", "3"]):
        ns, _ = v.parse_cli(["serve", MODEL, *args])
        assert ns.optimization_level == "3"


def test_max_model_len_auto() -> None:
    ns, _ = v.parse_cli(["serve", MODEL, "--max-model-len", "auto"])
    assert ns.max_model_len == -1


# --------------------------------------------------------------------------- HTTP

def test_health_is_open_and_empty(server: Standin) -> None:
    status, headers, body = server.request("GET", "/health", key=None)
    assert (status, body) == (200, b"")
    assert headers["content-length"] == "0"


def test_metrics_and_version_are_open(server: Standin) -> None:
    status, headers, body = server.request("GET", "/metrics", key=None)
    assert status == 200 and headers["content-type"].startswith("text/plain; version=1.0.0")
    status, _, body = server.request("GET", "/version", key=None)
    assert status == 200 and json.loads(body) == {"version": str(PINNED_VERSION)}


@pytest.mark.parametrize("key", [None, "wrong"])
def test_v1_requires_the_api_key(server: Standin, key: str | None) -> None:
    status, headers, body = server.request("GET", "/v1/models", key=key)
    assert status == 401
    assert json.loads(body) == {"error": "Unauthorized"}
    assert headers["content-type"] == "application/json"
    status, _, _ = server.request("POST", "/v1/completions", {"prompt": "x"}, key=key)
    assert status == 401


def test_basic_auth_scheme_is_rejected(server: Standin) -> None:
    status, _, _ = server.request("GET", "/v1/models", key=None,
                                  headers={"Authorization": f"Basic {KEY}"})
    assert status == 401


def test_models_lists_served_names(server: Standin) -> None:
    status, _, body = server.request("GET", "/v1/models")
    assert status == 200
    data = json.loads(body)
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == ["llama3"]
    model = data["data"][0]
    assert model["root"] == MODEL and model["object"] == "model"
    assert model["owned_by"] == "vllm" and model["max_model_len"] == 8192


def test_chat_completion(server: Standin) -> None:
    req = {"model": "llama3", "messages": [{"role": "system", "content": "be brief"},
                                           {"role": "user", "content": "Say hello."}],
           "max_tokens": 5}
    status, headers, body = server.request("POST", "/v1/chat/completions", req)
    assert status == 200 and headers["content-type"] == "application/json"
    data = json.loads(body)
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    assert data["system_fingerprint"].startswith(f"vllm-{PINNED_VERSION}-")
    assert data["model"] == "llama3"
    choice = data["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] == "length"
    usage = data["usage"]
    assert usage["completion_tokens"] == 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + 5
    # deterministic text
    again = json.loads(server.request("POST", "/v1/chat/completions", req)[2])
    assert again["choices"][0]["message"]["content"] == choice["message"]["content"]


def test_completion_default_model_and_stop(server: Standin) -> None:
    status, _, body = server.request("POST", "/v1/completions",
                                     {"prompt": "The capital of France is", "max_tokens": 500})
    assert status == 200
    data = json.loads(body)
    assert data["object"] == "text_completion" and data["model"] == "llama3"
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"]["prompt_tokens"] == 5
    assert 16 <= data["usage"]["completion_tokens"] < 64


def _sse(body: bytes) -> list[str]:
    events = [e for e in body.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    return [e[len("data: "):] for e in events]


def test_chat_streaming(server: Standin) -> None:
    req = {"model": "llama3", "messages": [{"role": "user", "content": "count"}],
           "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
    status, headers, body = server.request("POST", "/v1/chat/completions", req)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = _sse(body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c["choices"][0]["delta"].get("content") for c in chunks[1:] if c["choices"]]
    assert len([c for c in content if c]) == 4
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finals[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_completion_streaming(server: Standin) -> None:
    req = {"model": "llama3", "prompt": "hi", "max_tokens": 3, "stream": True}
    status, _, body = server.request("POST", "/v1/completions", req)
    events = _sse(body)
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in chunks)


def test_metrics_have_vllm_names_and_count_requests(server: Standin) -> None:
    server.request("POST", "/v1/completions", {"prompt": "one two three", "max_tokens": 2})
    status, _, body = server.request("GET", "/metrics", key=None)
    text = body.decode()
    lab = 'engine="0",model_name="llama3"'
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc"):
        assert f"# TYPE {name} gauge" in text and f"{name}{{{lab}}} " in text
    for name in ("vllm:prompt_tokens", "vllm:generation_tokens", "vllm:request_success"):
        assert f"# TYPE {name}_total counter" in text and f"# TYPE {name}_created gauge" in text
    for name in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds"):
        assert f"# TYPE {name} histogram" in text
        assert f'{name}_bucket{{engine="0",le="+Inf",model_name="llama3"}}' in text
        assert f"{name}_count{{{lab}}}" in text and f"{name}_sum{{{lab}}}" in text

    def value(prefix: str) -> float:
        line = next(ln for ln in text.splitlines() if ln.startswith(prefix))
        return float(line.rsplit(" ", 1)[1])

    assert value(f"vllm:prompt_tokens_total{{{lab}}}") >= 3
    assert value(f"vllm:generation_tokens_total{{{lab}}}") >= 2
    assert value('vllm:request_success_total{engine="0",finished_reason="length",'
                 'model_name="llama3"}') >= 1
    assert value(f"vllm:num_requests_running{{{lab}}}") == 0


def test_api_errors(server: Standin) -> None:
    status, _, body = server.request("POST", "/v1/completions", {"model": "gpt-4", "prompt": "x"})
    err = json.loads(body)["error"]
    assert status == 404 and err["type"] == "NotFoundError" and "gpt-4" in err["message"]
    assert err["message"].endswith("Valid aliases: llama3.")
    status, _, body = server.request("POST", "/v1/completions",
                                     {"model": "llama3", "prompt": "x", "max_tokens": 9000})
    assert status == 400 and "max_tokens=9000 cannot be greater than max_model_len=8192" in \
        json.loads(body)["error"]["message"]
    status, _, body = server.request("POST", "/v1/completions",
                                     {"model": "llama3", "prompt": "x " * 8000, "max_tokens": 500})
    assert status == 400 and "maximum context length is 8192" in json.loads(body)["error"][
        "message"]
    status, _, _ = server.request("POST", "/v1/chat/completions", b"{not json")
    assert status == 400
    status, _, _ = server.request("POST", "/v1/completions",
                                  {"prompt": "x", "stream": True, "stream_options": "yes"})
    assert status == 400
    status, _, body = server.request("POST", "/v1/chat/completions", {"messages": []})
    assert status == 400 and "empty conversation" in json.loads(body)["error"]["message"]
    status, _, body = server.request("GET", "/v1/nope")
    assert (status, json.loads(body)) == (404, {"detail": "Not Found"})
    status, headers, _ = server.request("GET", "/v1/chat/completions")
    assert status == 405 and headers["allow"] == "POST"
    # an unauthenticated request to a /v1 path that does not exist is still 401
    assert server.request("GET", "/v1/nope", key=None)[0] == 401


def test_keepalive_survives_rejected_posts(server: Standin) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("POST", "/v1/completions", body=b'{"prompt": "x"}')  # 401, body not read
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 401
    conn.request("GET", "/health")
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200
    conn.close()


# --------------------------------------------------------------------------- lifecycle

def test_port_is_closed_during_cold_start(run: Any) -> None:
    port = free_port()
    s = run(["serve", MODEL, "--host", "127.0.0.1", "--port", str(port)],
            {"VLLM_STANDIN_COLD_START_S": "1.5"})
    time.sleep(0.3)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert s.wait_ready() == port
    assert s.request("GET", "/health")[0] == 200
    out = s.output()
    assert "Starting to load model " + MODEL in out and "Loading weights took" in out
    assert out.index("Loading weights") < out.index("Starting vLLM server on")


def test_vllm_api_key_from_environment(run: Any) -> None:
    s = run(["serve", MODEL, "--host", "127.0.0.1", "--port", "0"], {"VLLM_API_KEY": "envkey"})
    s.wait_ready()
    assert s.request("GET", "/v1/models", key=None)[0] == 401
    assert s.request("GET", "/v1/models", key="envkey")[0] == 200


def test_no_key_means_open_v1(run: Any) -> None:
    s = run(["serve", MODEL, "--host", "127.0.0.1", "--port", "0"])
    s.wait_ready()
    assert s.request("GET", "/v1/models", key=None)[0] == 200


def test_sigterm_exits_zero_quickly(run: Any) -> None:
    s = run(["serve", MODEL, "--host", "127.0.0.1", "--port", "0"])
    s.wait_ready()
    t0 = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    assert s.wait_exit(5) == 0
    assert time.monotonic() - t0 < 2
    assert "Application shutdown complete." in s.output()


def test_sigterm_during_cold_start_exits_zero(run: Any) -> None:
    s = run(["serve", MODEL, "--host", "127.0.0.1", "--port", "0"],
            {"VLLM_STANDIN_COLD_START_S": "30"})
    time.sleep(0.5)
    s.proc.send_signal(signal.SIGTERM)
    assert s.wait_exit(5) == 0


def test_fail_crash(run: Any) -> None:
    s = run(["serve", MODEL, "--host", "127.0.0.1", "--port", "0"],
            {"VLLM_STANDIN_FAIL": "crash"})
    assert s.wait_exit() == 1
    out = s.output()
    assert "RuntimeError: Engine core initialization failed" in out
    assert "Starting vLLM API server" not in out


def test_fail_oom(run: Any) -> None:
    s = run(["serve", MODEL, "--host", "127.0.0.1", "--port", "0",
             "--gpu-memory-utilization", "0.95"], {"VLLM_STANDIN_FAIL": "oom"})
    assert s.wait_exit() == 1
    out = s.output()
    assert "ValueError: Free memory on device" in out
    assert "Free memory on device cuda:0 (" in out
    assert "desired GPU memory utilization (0.95, 75.23 GiB)" in out
    assert "CUDA out of memory" in out


def test_fail_never_healthy(run: Any) -> None:
    s = run(["serve", MODEL, "--host", "127.0.0.1", "--port", "0"],
            {"VLLM_STANDIN_FAIL": "never-healthy"})
    s.wait_ready()
    for _ in range(3):
        assert s.request("GET", "/health")[0] == 503
        time.sleep(0.1)
    assert s.request("GET", "/v1/models")[0] == 200


def test_fail_engine_dead_exits_zero_like_vllm(run: Any) -> None:
    s = run(["serve", MODEL, "--host", "127.0.0.1", "--port", "0"],
            {"VLLM_STANDIN_FAIL": "engine-dead:0.3"})
    s.wait_ready()
    assert s.wait_exit(5) == 0
    assert "EngineDeadError" in s.output()


def test_hf_hub_offline_serves_a_staged_snapshot(run: Any, tmp_path: Any) -> None:
    commit = "a" * 40
    snap = tmp_path / "hub" / f"models--{MODEL.replace('/', '--')}" / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    s = run(["serve", "--model", MODEL, "--revision", commit, "--host", "127.0.0.1", "--port",
             "0"], {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    s.wait_ready()
    out = s.output()
    assert f"HF_HUB_OFFLINE=1: {MODEL} found in the local Hugging Face cache" in out
    assert "unauthenticated requests to the HF Hub" not in out


def test_hf_hub_offline_without_staged_weights_fails_like_vllm(run: Any, tmp_path: Any) -> None:
    s = run(["serve", MODEL, "--host", "127.0.0.1", "--port", "0"],
            {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert s.wait_exit() == 1
    assert "LocalEntryNotFoundError: Cannot find the requested files in the disk cache" in s.output()


def test_max_model_len_above_the_model_limit_fails(run: Any) -> None:
    s = run(["serve", MODEL, "--host", "127.0.0.1", "--port", "0", "--max-model-len", "32768"])
    assert s.wait_exit() == 1
    assert "User-specified max_model_len (32768) is greater than the derived" in s.output()


def test_port_in_use_fails(run: Any) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        s = run(["serve", MODEL, "--host", "127.0.0.1", "--port", str(port)])
        assert s.wait_exit() == 1
        assert "Address already in use" in s.output()


def test_logs_look_like_vllm(server: Standin) -> None:
    out = server.output()
    assert "gpufleet lab STAND-IN" in out
    assert f"█ ▀▄▀ █  version {PINNED_VERSION}" in out
    assert "non-default args: {'model_tag': " in out and "'api_key': '***'" in out
    assert KEY not in out
    assert re.search(r"\(APIServer pid=\d+\) INFO \d\d-\d\d \d\d:\d\d:\d\d \[entry\.py:\d+\] "
                     r"Starting vLLM server on http://127\.0\.0\.1:\d+", out)
    assert "\nINFO:     Application startup complete.\n" in out


def test_invocations_serves_without_a_key_like_vllm(server: Standin) -> None:
    # vLLM 0.32 guards only /v1, /v2, /inference and /cohere: SageMaker's route runs inference
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    status, _, body = server.request("POST", "/invocations", chat, key=None)
    assert status == 200 and json.loads(body)["object"] == "chat.completion"
    status, _, body = server.request("POST", "/invocations", {"prompt": "hi", "max_tokens": 2},
                                     key=None)
    assert status == 200 and json.loads(body)["object"] == "text_completion"
    for path in ("/v2/x", "/inference/v1/generate", "/cohere/x"):
        assert server.request("POST", path, {}, key=None)[0] == 401
    assert server.request("POST", "/inference/v1/generate", {})[0] == 403


def test_routes_match_like_starlette() -> None:
    assert v.find_route("/v1/responses/render", "POST") == (("GET", "POST"), "scale_out_disabled")
    assert v.find_route("/v1/responses/resp_1", "GET") == (("GET",), "response_not_found")
    assert v.find_route("/v1/responses/resp_1", "POST") == (("GET",), None)
    assert v.find_route("/ping", "POST") == (("GET", "POST"), "health")
    assert v.find_route("/nope", "GET") is None


def test_killing_the_engine_core_ends_the_server_with_status_zero(run: Any) -> None:
    s = run(["serve", MODEL, "--host", "127.0.0.1", "--port", "0"])
    s.wait_ready()
    children = Path(f"/proc/{s.proc.pid}/task/{s.proc.pid}/children").read_text().split()
    core = next(int(c) for c in children
                if Path(f"/proc/{c}/comm").read_text().strip() == "VLLM::EngineCor")
    os.kill(core, signal.SIGKILL)
    time.sleep(0.5)
    assert s.request("GET", "/health")[0] == 503
    assert s.wait_exit(10) == 0
    assert "EngineDeadError" in s.output()
