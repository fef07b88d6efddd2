#!/usr/bin/python3
"""STAND-IN for ``vllm serve`` (vLLM v0.11 OpenAI-compatible server). gpufleet lab only.

This is NOT vLLM. It has no GPU code, loads no weights and generates deterministic filler
text. It exists so that the gpufleet lab can run the real deploy path (``docker run
vllm/vllm-openai:<tag> --model <id> <flags>``) on machines without GPUs, and so that the
deploy's verification step talks to something that speaks vLLM's real protocol:

* CLI: ``vllm serve [model_tag] [options]`` with vLLM's real flag names, types and choices;
  unknown flags fail exactly like vLLM's argparse (``vllm: error: unrecognized arguments: X``,
  exit 2), from the flag set generated from the pinned vLLM's own parser
  (``vllm_serve_flags.json``); ``--model X`` is rewritten to the positional tag with vLLM's
  deprecation warning; ``--snake_case`` flags are accepted like vLLM's FlexibleArgumentParser
  does.
* Cold start: the port refuses connections until the "model is loaded", as in vLLM.
* HTTP: ``GET /health`` (200, empty body), ``GET /v1/models``, ``POST /v1/completions`` and
  ``POST /v1/chat/completions`` (OpenAI shapes, usage, SSE streaming ending ``data: [DONE]``),
  ``GET /metrics`` (Prometheus text with vLLM's metric names), ``GET /version``, ``GET /ping``,
  ``GET /load``. ``--api-key``/``VLLM_API_KEY`` guards only paths starting with ``/v1``
  (401 ``{"error": "Unauthorized"}``), like vLLM's middleware.

Stand-in knobs (environment):
  VLLM_STANDIN_COLD_START_S   seconds before the port opens (default 2)
  VLLM_STANDIN_TOKENS_PER_S   generation speed (default 200)
  VLLM_STANDIN_FAIL           crash | oom | never-healthy | engine-dead:<seconds>
  VLLM_STANDIN_VERSION        version reported by --version and /version (default 0.11.0)
  VLLM_STANDIN_GPU_MEM_GIB    total GPU memory used in the OOM message (default 79.19)
Real vLLM environment honoured: VLLM_API_KEY, HF_HUB_OFFLINE, HF_TOKEN.

Stdlib only; runs on Debian bookworm's python3 (3.11) inside the stand-in image and on the
controller for unit tests.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

DEFAULT_VERSION = "0.11.0"
STANDIN_MARKER = "gpufleet-lab-standin"

# vLLM's serve options (names, kinds, types, defaults, choices) come from the one data file
# gpufleet checks extra_args against: next to this script in the stand-in image, else in the
# installed gpufleet package (controller, unit tests).
FLAGS_FILE = "vllm_serve_flags.json"


def _load_serve_flags() -> list[dict[str, Any]]:
    beside = Path(__file__).resolve().with_name(FLAGS_FILE)
    if beside.is_file():
        text = beside.read_text(encoding="utf-8")
    else:
        from importlib import resources

        text = resources.files("gpufleet.model").joinpath(FLAGS_FILE).read_text(encoding="utf-8")
    flags: list[dict[str, Any]] = json.loads(text)["flags"]
    return flags


SERVE_FLAGS = _load_serve_flags()



# model id -> (architecture, max_position_embeddings, weights GiB at bf16)
KNOWN_MODELS: dict[str, tuple[str, int, float]] = {
    "meta-llama/Meta-Llama-3-8B-Instruct": ("LlamaForCausalLM", 8192, 14.99),
    "meta-llama/Meta-Llama-3-8B": ("LlamaForCausalLM", 8192, 14.99),
    "meta-llama/Llama-3.1-8B-Instruct": ("LlamaForCausalLM", 131072, 14.99),
    "meta-llama/Meta-Llama-3.1-8B-Instruct": ("LlamaForCausalLM", 131072, 14.99),
    "meta-llama/Llama-3.1-70B-Instruct": ("LlamaForCausalLM", 131072, 131.4),
    "meta-llama/Llama-3.3-70B-Instruct": ("LlamaForCausalLM", 131072, 131.4),
    "mistralai/Mistral-7B-Instruct-v0.3": ("MistralForCausalLM", 32768, 13.5),
    "Qwen/Qwen2.5-7B-Instruct": ("Qwen2ForCausalLM", 32768, 14.2),
    "Qwen/Qwen2.5-0.5B-Instruct": ("Qwen2ForCausalLM", 32768, 0.93),
    "Qwen/Qwen3-0.6B": ("Qwen3ForCausalLM", 40960, 1.12),
    "Qwen/Qwen3-8B": ("Qwen3ForCausalLM", 40960, 15.27),
}
DEFAULT_ARCH = ("LlamaForCausalLM", 32768, 14.99)

_WORDS = (
    "the", "model", "stand-in", "answers", "with", "deterministic", "text", "for", "gpufleet",
    "lab", "tests", "and", "never", "runs", "on", "a", "real", "GPU", "so", "every", "reply",
    "is", "reproducible", "from", "its", "prompt", "token", "stream", "endpoint", "health",
)

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)


def _version() -> str:
    return os.environ.get("VLLM_STANDIN_VERSION") or DEFAULT_VERSION


# --------------------------------------------------------------------------- logging

class Log:
    """vLLM-like log lines on stdout, flushed (docker logs / journald see them at once)."""

    def __init__(self, proc: str = "APIServer") -> None:
        self.proc = proc
        self.pid = os.getpid()
        self.lock = threading.Lock()

    def _emit(self, level: str, where: str, msg: str, proc: str | None = None) -> None:
        stamp = time.strftime("%m-%d %H:%M:%S")
        p = proc or self.proc
        prefix = f"({p} pid={self.pid}) " if p else ""
        with self.lock:
            for line in msg.splitlines() or [""]:
                sys.stdout.write(f"{prefix}{level} {stamp} [{where}] {line}\n")
            sys.stdout.flush()

    def info(self, where: str, msg: str, proc: str | None = None) -> None:
        self._emit("INFO", where, msg, proc)

    def warning(self, where: str, msg: str, proc: str | None = None) -> None:
        self._emit("WARNING", where, msg, proc)

    def error(self, where: str, msg: str, proc: str | None = None) -> None:
        self._emit("ERROR", where, msg, proc)

    def uvicorn(self, msg: str) -> None:
        with self.lock:
            sys.stdout.write(f"({self.proc} pid={self.pid}) INFO:     {msg}\n")
            sys.stdout.flush()


# --------------------------------------------------------------------------- CLI

def human_readable_int(value: str) -> int:
    """vLLM's parser for token counts: '1k' = 1000, '1K' = 1024, '25.6k' = 25600."""
    value = value.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgGtT])", value)
    if match:
        number, suffix = match.groups()
        decimal = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
        binary = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
        if suffix in decimal:
            return int(float(number) * decimal[suffix])
        try:
            return int(number) * binary[suffix]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(
                f"Decimals are not allowed with binary suffixes like {suffix}. "
                f"Did you mean to use {number}{suffix.lower()} instead?"
            ) from exc
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    """The ``vllm`` CLI: top-level parser plus a ``serve`` subparser with vLLM's flags."""
    parser = argparse.ArgumentParser(
        prog="vllm", description="vLLM CLI (gpufleet lab stand-in)", allow_abbrev=False,
        epilog="For full list: vllm [subcommand] --help=all")
    parser.add_argument("-v", "--version", action="version", version=_version())
    subparsers = parser.add_subparsers(required=False, dest="subparser")
    for name in ("chat", "complete"):
        subparsers.add_parser(name, help=f"(not in the stand-in) vllm {name}",
                              allow_abbrev=False)
    serve = subparsers.add_parser(
        "serve", allow_abbrev=False, usage="vllm serve [model_tag] [options]",
        help="Launch a local OpenAI-compatible API server to serve LLM completions via HTTP.",
        description="Launch a local OpenAI-compatible API server (gpufleet lab STAND-IN: "
                    "no GPU, no weights, deterministic text).")
    for name in ("bench", "collect-env", "run-batch"):
        subparsers.add_parser(name, help=f"(not in the stand-in) vllm {name}",
                              allow_abbrev=False)
    _add_serve_args(serve)
    return parser


def human_readable_int_or_auto(value: str) -> int:
    """vLLM's parser for --max-model-len: a token count, or -1/'auto' (-1: auto-detect)."""
    value = value.strip()
    return -1 if value == "-1" or value.lower() == "auto" else human_readable_int(value)


def json_or_str(value: str) -> Any:
    """vLLM's union_dict_and_str: a JSON object when it looks like one, else the string."""
    return json.loads(value) if re.fullmatch(r"(?s)\s*{.*}\s*", value) else value


_VALUE_TYPES: dict[str, Any] = {"str": str, "int": int, "float": float, "json": json.loads,
                                "json_or_str": json_or_str, "human_int": human_readable_int,
                                "human_int_or_auto": human_readable_int_or_auto}


def _add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_tag", type=str, nargs="?", help="The model tag to serve "
                   "(optional if specified in config)")
    groups: dict[str, argparse._ActionsContainer] = {}
    for entry in SERVE_FLAGS:
        title = entry.get("group")
        where: argparse._ActionsContainer = p
        if title:
            where = groups.get(title) or groups.setdefault(title, p.add_argument_group(title))
        names = (entry["flag"], *entry.get("aliases", ()))
        kw: dict[str, Any] = {"default": entry.get("default"), "help": entry.get("help")}
        kind = entry["kind"]
        if kind == "switch":
            kw["action"] = argparse.BooleanOptionalAction
        elif kind == "store_true":
            kw["action"] = "store_true"
        else:
            kw["type"] = _VALUE_TYPES[entry["type"]]
            if "choices" in entry:
                kw["choices"] = tuple(entry["choices"])
            if kind == "values":
                kw["nargs"] = "+"
            elif kind == "append":
                kw["action"] = "append"
            elif kind == "optional_value":
                kw["nargs"] = "?"
                kw["const"] = entry.get("const")
            elif kind != "value":
                raise ValueError(f"{FLAGS_FILE}: {entry['flag']} has an unknown kind {kind!r}")
        where.add_argument(*names, **kw)


def preprocess_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """What vLLM's FlexibleArgumentParser.parse_args does before argparse runs (0.32.0).

    Returns (processed argv, warnings). ``serve ... --model X`` becomes ``serve X ...``,
    ``--max_model_len`` becomes ``--max-model-len`` and ``-O3`` ``--optimization-level 3``.
    """
    args = list(argv)
    warnings: list[str] = []
    if args and args[0] == "serve":
        idx = next((i for i, a in enumerate(args)
                    if a == "--model" or a.startswith("--model=")), None)
        if idx is not None:
            warnings.append(
                "With `vllm serve`, you should provide the model as a positional argument "
                "or in a config file instead of via the `--model` option. The `--model` "
                "option will be removed in a future version.")
            if args[idx] == "--model":
                if idx + 1 < len(args):
                    tag, rest = args[idx + 1], idx + 2
                    args = ["serve", tag, *args[1:idx], *args[rest:]]
            else:
                tag = args[idx].removeprefix("--model=")
                args = ["serve", tag, *args[1:idx], *args[idx + 1:]]
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg.startswith("--"):
            key, sep, value = arg.partition("=")
            out.append(key.replace("_", "-") + sep + value)
        elif arg.startswith("-O") and arg != "-O":  # -O3, -O=3: --optimization-level 3
            out += ["--optimization-level", arg[3:] if arg[2] == "=" else arg[2:]]
        elif arg == "-O" and i + 1 < len(args) and args[i + 1] in ("0", "1", "2", "3"):
            out.append("--optimization-level")
        else:
            out.append(arg)
    return out, warnings


def parse_cli(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Parse like ``vllm <argv>``; raises SystemExit(2) with argparse's message on errors."""
    processed, warnings = preprocess_argv(argv)
    ns = build_parser().parse_args(processed)
    if getattr(ns, "model_tag", None):
        ns.model = ns.model_tag
    return ns, warnings


# --------------------------------------------------------------------------- engine

def count_tokens(text: str) -> int:
    """Stand-in tokenizer: words and punctuation marks (roughly like a BPE count)."""
    return max(1, len(re.findall(r"\w+|[^\w\s]", text)))


def generate_tokens(seed_text: str, limit: int | None) -> tuple[list[str], str]:
    """Deterministic tokens for a prompt; returns (tokens, finish_reason)."""
    digest = hashlib.sha256(seed_text.encode()).digest()
    natural = 16 + digest[0] % 48
    n = natural if limit is None else min(natural, limit)
    tokens = []
    for i in range(n):
        word = _WORDS[(digest[(i + 1) % len(digest)] + i * 7) % len(_WORDS)]
        tokens.append(word if i == 0 else " " + word)
    if n == natural and tokens:
        tokens[-1] = tokens[-1] + "."
    return tokens, ("length" if limit is not None and limit < natural else "stop")


class Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1


class Metrics:
    """The vLLM v1 Prometheus metrics that gpufleet reads, with vLLM's names and labels."""

    def __init__(self, model_name: str, cache_info: dict[str, str]) -> None:
        self.lock = threading.Lock()
        self.model_name = model_name
        self.cache_info = cache_info
        self.created = time.time()
        self.running = 0
        self.waiting = 0
        self.kv_usage = 0.0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.preemptions = 0
        self.success: dict[str, int] = {"stop": 0, "length": 0, "abort": 0}
        self.ttft = Histogram(TTFT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.queue = Histogram(E2E_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.itl = Histogram(TPOT_BUCKETS)

    def render(self) -> str:
        with self.lock:
            return self._render()

    def _render(self) -> str:
        base = f'model_name="{_esc(self.model_name)}",engine="0"'
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        def gauge(name: str, help_text: str, value: float) -> None:
            family(name, "gauge", help_text)
            out.append(f"{name}{{{base}}} {float(value)!r}")

        def counter(name: str, help_text: str, value: float, extra: str = "") -> None:
            family(name, "counter", help_text)
            labels = base + extra
            out.append(f"{name}_total{{{labels}}} {float(value)!r}")
            out.append(f"{name}_created{{{labels}}} {self.created!r}")

        def histogram(name: str, help_text: str, h: Histogram) -> None:
            family(name, "histogram", help_text)
            for edge, count in zip(h.buckets, h.counts, strict=True):
                out.append(f'{name}_bucket{{{base},le="{float(edge)!r}"}} {float(count)!r}')
            out.append(f'{name}_bucket{{{base},le="+Inf"}} {float(h.total)!r}')
            out.append(f"{name}_count{{{base}}} {float(h.total)!r}")
            out.append(f"{name}_sum{{{base}}} {h.sum!r}")
            out.append(f"{name}_created{{{base}}} {self.created!r}")

        gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
              self.running)
        gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
              self.waiting)
        gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
              self.kv_usage)
        family("vllm:num_preemptions", "counter", "Cumulative number of preemption from the "
               "engine.")
        out.append(f"vllm:num_preemptions_total{{{base}}} {float(self.preemptions)!r}")
        out.append(f"vllm:num_preemptions_created{{{base}}} {self.created!r}")
        counter("vllm:prompt_tokens", "Number of prefill tokens processed.", self.prompt_tokens)
        counter("vllm:generation_tokens", "Number of generation tokens processed.",
                self.generation_tokens)
        family("vllm:request_success", "counter", "Count of successfully processed requests.")
        for reason, value in self.success.items():
            labels = f'{base},finished_reason="{reason}"'
            out.append(f"vllm:request_success_total{{{labels}}} {float(value)!r}")
            out.append(f"vllm:request_success_created{{{labels}}} {self.created!r}")
        histogram("vllm:time_to_first_token_seconds",
                  "Histogram of time to first token in seconds.", self.ttft)
        histogram("vllm:time_per_output_token_seconds",
                  "Histogram of time per output token in seconds.DEPRECATED: Use "
                  "vllm:inter_token_latency_seconds instead.", self.tpot)
        histogram("vllm:inter_token_latency_seconds",
                  "Histogram of inter-token latency in seconds.", self.itl)
        histogram("vllm:e2e_request_latency_seconds",
                  "Histogram of e2e request latency in seconds.", self.e2e)
        histogram("vllm:request_queue_time_seconds",
                  "Histogram of time spent in WAITING phase for request.", self.queue)
        family("vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig")
        info = ",".join(f'{k}="{_esc(v)}"' for k, v in sorted(self.cache_info.items()))
        out.append(f'vllm:cache_config_info{{{info},engine="0"}} 1.0')
        return "\n".join(out) + "\n"


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Engine:
    """Admission (max_num_seqs), timing (tokens/s) and metrics of the fake engine."""

    def __init__(self, args: argparse.Namespace, tokens_per_s: float) -> None:
        self.model = args.model
        self.served = list(args.served_model_name or [args.model])
        self.max_model_len = args.max_model_len
        self.max_num_seqs = args.max_num_seqs or 256
        self.tokens_per_s = max(tokens_per_s, 0.001)
        self.slots = threading.BoundedSemaphore(self.max_num_seqs)
        self.created = int(time.time())
        self.active_tokens = 0
        self.capacity_tokens = max(1, self.max_num_seqs * self.max_model_len // 4)
        self.healthy = True
        cache_info = {
            "block_size": str(args.block_size or 16),
            "cache_dtype": args.kv_cache_dtype,
            "enable_prefix_caching": str(args.enable_prefix_caching is not False),
            "gpu_memory_utilization": str(args.gpu_memory_utilization),
            "num_cpu_blocks": "None",
            "num_gpu_blocks": str(self.capacity_tokens // 16),
        }
        self.metrics = Metrics(self.served[0], cache_info)

    def run(self, prompt_tokens: int, seed_text: str, limit: int | None,
            ) -> Iterator[tuple[str, str | None]]:
        """Yield (token, None) ... then ("", finish_reason); sleeps like a real engine."""
        m = self.metrics
        t0 = time.monotonic()
        with m.lock:
            m.waiting += 1
        self.slots.acquire()
        queued = time.monotonic() - t0
        tokens, reason = generate_tokens(seed_text, limit)
        with m.lock:
            m.waiting -= 1
            m.running += 1
            self.active_tokens += prompt_tokens + len(tokens)
            m.kv_usage = min(1.0, self.active_tokens / self.capacity_tokens)
            m.queue.observe(queued)
        finished = False
        try:
            prefill = prompt_tokens / (self.tokens_per_s * 50.0)
            time.sleep(prefill + 1.0 / self.tokens_per_s)
            ttft = time.monotonic() - t0
            last = time.monotonic()
            for i, token in enumerate(tokens):
                if i:
                    time.sleep(1.0 / self.tokens_per_s)
                    now = time.monotonic()
                    with m.lock:
                        m.itl.observe(now - last)
                        m.tpot.observe(now - last)
                    last = now
                yield token, None
            finished = True
            yield "", reason
        finally:
            with m.lock:
                m.running -= 1
                self.active_tokens -= prompt_tokens + len(tokens)
                m.kv_usage = min(1.0, max(0.0, self.active_tokens / self.capacity_tokens))
                m.prompt_tokens += prompt_tokens
                m.generation_tokens += len(tokens)
                if finished:
                    m.success[reason] += 1
                    m.ttft.observe(ttft)
                    m.e2e.observe(time.monotonic() - t0)
                else:
                    m.success["abort"] += 1
            self.slots.release()


# --------------------------------------------------------------------------- HTTP

class APIError(Exception):
    def __init__(self, status: int, message: str, err_type: str = "BadRequestError",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.err_type,
                          "param": self.param, "code": self.status}}


ROUTES: dict[str, tuple[str, ...]] = {
    "/health": ("GET",), "/ping": ("GET", "POST"), "/load": ("GET",), "/version": ("GET",),
    "/metrics": ("GET",), "/v1/models": ("GET",), "/v1/completions": ("POST",),
    "/v1/chat/completions": ("POST",), "/tokenize": ("POST",), "/detokenize": ("POST",),
}


class StandinHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, sock: socket.socket, app: App) -> None:
        self.app = app
        super().__init__(sock.getsockname()[:2], Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_address = sock.getsockname()[:2]


class App:
    """Everything the handlers need: engine, auth keys, health state, logging."""

    def __init__(self, args: argparse.Namespace, engine: Engine, api_keys: list[str],
                 log: Log, never_healthy: bool) -> None:
        self.args = args
        self.engine = engine
        self.api_keys = api_keys
        self.log = log
        self.never_healthy = never_healthy
        self.access_log = not args.disable_uvicorn_access_log and args.uvicorn_log_level in (
            "info", "debug", "trace")

    def authorized(self, header: str | None) -> bool:
        if not self.api_keys:
            return True
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        tok = hashlib.sha256(token.encode()).digest()
        return any(hmac.compare_digest(tok, hashlib.sha256(k.encode()).digest())
                   for k in self.api_keys)


class Handler(BaseHTTPRequestHandler):
    server_version = "uvicorn"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    server: StandinHTTPServer

    # ---- plumbing
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        pass

    def _access(self, status: int) -> None:
        app = self.server.app
        if app.access_log:
            from http import HTTPStatus
            try:
                phrase = HTTPStatus(status).phrase
            except ValueError:
                phrase = ""
            app.log.uvicorn(f'{self.client_address[0]}:{self.client_address[1]} - '
                            f'"{self.command} {self.path} HTTP/1.1" {status} {phrase}')

    def _send(self, status: int, body: bytes, ctype: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        self._headers_sent = True
        self.send_response_only(status)
        self.send_header("date", self.date_time_string())
        self.send_header("server", "uvicorn")
        self.send_header("content-length", str(len(body)))
        if body or ctype != "application/json":
            self.send_header("content-type", ctype)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._access(status)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj, separators=(",", ":")).encode(), headers=headers)

    def _body(self) -> Any:
        try:
            return json.loads(self._raw or b"null")
        except ValueError as exc:
            raise APIError(400, f"JSON decode error: {exc}") from exc

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch()

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch()

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch()

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch()

    def do_OPTIONS(self) -> None:  # noqa: N802
        self._dispatch()

    # ---- routing
    def _dispatch(self) -> None:
        app = self.server.app
        length = int(self.headers.get("content-length") or 0)
        # always drain the body, so that keep-alive connections stay in sync after errors
        self._raw = self.rfile.read(length) if length > 0 else b""
        self._headers_sent = False
        path = self.path.split("?", 1)[0]
        root = app.args.root_path or ""
        if root and path.startswith(root):
            path = path[len(root):] or "/"
        try:
            if (self.command != "OPTIONS" and path.startswith("/v1")
                    and not app.authorized(self.headers.get("authorization"))):
                self._json(401, {"error": "Unauthorized"})
                return
            methods = ROUTES.get(path)
            if methods is None:
                self._json(404, {"detail": "Not Found"})
                return
            if self.command not in methods and not (self.command == "HEAD" and "GET" in methods):
                self._json(405, {"detail": "Method Not Allowed"},
                           headers={"allow": ", ".join(methods)})
                return
            getattr(self, "_route_" + path.strip("/").replace("/", "_"))()
        except APIError as err:
            self._json(err.status, err.body())
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:  # like vLLM: a handler bug is a 500, the server keeps going
            app.log.error("api_server.py:1100", f"Internal error on {self.command} {path}: "
                          f"{type(exc).__name__}: {exc}")
            if not self._headers_sent:
                self._json(500, APIError(500, f"{type(exc).__name__}: {exc}",
                                         "InternalServerError").body())
            self.close_connection = True

    # ---- endpoints
    def _route_health(self) -> None:
        app = self.server.app
        ok = app.engine.healthy and not app.never_healthy
        self._send(200 if ok else 503, b"")

    def _route_ping(self) -> None:
        self._route_health()

    def _route_load(self) -> None:
        m = self.server.app.engine.metrics
        self._json(200, {"server_load": m.running + m.waiting})

    def _route_version(self) -> None:
        self._json(200, {"version": _version()})

    def _route_metrics(self) -> None:
        body = self.server.app.engine.metrics.render().encode()
        self._send(200, body, ctype="text/plain; version=0.0.4; charset=utf-8")

    def _route_v1_models(self) -> None:
        eng = self.server.app.engine
        data = []
        for name in eng.served:
            data.append({
                "id": name, "object": "model", "created": eng.created, "owned_by": "vllm",
                "root": eng.model, "parent": None, "max_model_len": eng.max_model_len,
                "permission": [{
                    "id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission",
                    "created": eng.created, "allow_create_engine": False,
                    "allow_sampling": True, "allow_logprobs": True,
                    "allow_search_indices": False, "allow_view": True,
                    "allow_fine_tuning": False, "organization": "*", "group": None,
                    "is_blocking": False}],
            })
        self._json(200, {"object": "list", "data": data})

    def _route_tokenize(self) -> None:
        req = self._body() or {}
        text = req.get("prompt") or json.dumps(req.get("messages") or "")
        n = count_tokens(str(text))
        eng = self.server.app.engine
        self._json(200, {"count": n, "max_model_len": eng.max_model_len,
                         "tokens": list(range(n)), "token_strs": None})

    def _route_detokenize(self) -> None:
        req = self._body() or {}
        self._json(200, {"prompt": " ".join("tok" for _ in req.get("tokens") or [])})

    def _check_model(self, req: dict[str, Any]) -> str:
        eng = self.server.app.engine
        model = req.get("model")
        if model in (None, ""):
            return eng.served[0]
        if model not in eng.served:
            raise APIError(404, f"The model `{model}` does not exist.", "NotFoundError",
                           "model")
        return str(model)

    def _limit(self, req: dict[str, Any], prompt_tokens: int, default: int | None) -> int | None:
        eng = self.server.app.engine
        limit = req.get("max_completion_tokens", req.get("max_tokens", default))
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise APIError(400, "max_tokens must be at least 1, got " + str(limit) + ".")
        if prompt_tokens + (limit or 0) > eng.max_model_len:
            raise APIError(
                400, f"This model's maximum context length is {eng.max_model_len} tokens. "
                f"However, you requested {prompt_tokens + (limit or 0)} tokens "
                f"({prompt_tokens} in the messages, {limit or 0} in the completion). Please "
                "reduce the length of the messages or completion.", param="max_tokens")
        return limit

    def _route_v1_completions(self) -> None:
        req = self._body()
        if not isinstance(req, dict):
            raise APIError(400, "Expected a JSON object body")
        model = self._check_model(req)
        prompt = req.get("prompt")
        if isinstance(prompt, list):
            if not prompt:
                raise APIError(400, "Prompt cannot be empty", param="prompt")
            prompt = " ".join(str(p) for p in prompt)
        if not isinstance(prompt, str) or prompt == "":
            raise APIError(400, "Either prompt or prompt_embeds must be provided and non-empty.",
                           param="prompt")
        n_prompt = count_tokens(prompt)
        limit = self._limit(req, n_prompt, 16)
        self._generate("cmpl", "text_completion", model, req, prompt, n_prompt, limit,
                       echo=prompt if req.get("echo") else "")

    def _route_v1_chat_completions(self) -> None:
        req = self._body()
        if not isinstance(req, dict):
            raise APIError(400, "Expected a JSON object body")
        model = self._check_model(req)
        messages = req.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "messages: Field required" if messages is None
                           else "messages must be a non-empty list", param="messages")
        parts = []
        for msg in messages:
            if not isinstance(msg, dict) or msg.get("role") not in (
                    "system", "user", "assistant", "tool", "developer", "function"):
                raise APIError(400, f"Invalid message: {json.dumps(msg)[:200]}",
                               param="messages")
            content = msg.get("content")
            if isinstance(content, list):
                content = " ".join(str(c.get("text", "")) for c in content
                                   if isinstance(c, dict))
            parts.append(f"{msg['role']}: {content or ''}")
        text = "\n".join(parts)
        n_prompt = count_tokens(text) + 4 * len(messages)
        limit = self._limit(req, n_prompt, None)
        self._generate("chatcmpl", "chat.completion", model, req, text, n_prompt, limit)

    def _generate(self, prefix: str, obj: str, model: str, req: dict[str, Any], text: str,
                  n_prompt: int, limit: int | None, echo: str = "") -> None:
        eng = self.server.app.engine
        chat = obj == "chat.completion"
        rid = f"{prefix}-{uuid.uuid4().hex}"
        created = int(time.time())
        n = req.get("n") or 1
        if not isinstance(n, int) or n < 1:
            raise APIError(400, "n must be at least 1", param="n")
        seed = f"{eng.model}\x00{text}\x00{req.get('seed', '')}"
        if not isinstance(req.get("stream_options") or {}, dict):
            raise APIError(400, "stream_options: Input should be a valid dictionary",
                           param="stream_options")
        if req.get("stream"):
            self._stream(rid, obj, created, model, req, seed, n, n_prompt, limit, echo)
            return
        choices = []
        completion_tokens = 0
        for idx in range(n):
            toks: list[str] = []
            reason = "stop"
            for token, fin in eng.run(n_prompt, f"{seed}\x00{idx}", limit):
                if fin is None:
                    toks.append(token)
                else:
                    reason = fin
            completion_tokens += len(toks)
            out = "".join(toks)
            if chat:
                choices.append({"index": idx, "message": {
                    "role": "assistant", "content": out, "refusal": None, "annotations": None,
                    "audio": None, "function_call": None, "tool_calls": [],
                    "reasoning_content": None}, "logprobs": None, "finish_reason": reason,
                    "stop_reason": None, "token_ids": None})
            else:
                choices.append({"index": idx, "text": echo + out, "logprobs": None,
                                "finish_reason": reason, "stop_reason": None,
                                "token_ids": None, "prompt_logprobs": None,
                                "prompt_token_ids": None})
        body: dict[str, Any] = {
            "id": rid, "object": obj, "created": created, "model": model, "choices": choices,
            "service_tier": None, "system_fingerprint": None,
            "usage": {"prompt_tokens": n_prompt, "total_tokens": n_prompt + completion_tokens,
                      "completion_tokens": completion_tokens, "prompt_tokens_details": None},
            "prompt_logprobs": None, "prompt_token_ids": None, "kv_transfer_params": None}
        self._json(200, body)

    def _chunk(self, data: str) -> None:
        payload = data.encode()
        self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
        self.wfile.flush()

    def _stream(self, rid: str, obj: str, created: int, model: str, req: dict[str, Any],
                seed: str, n: int, n_prompt: int, limit: int | None, echo: str) -> None:
        eng = self.server.app.engine
        chat = obj == "chat.completion"
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"
        opts = req.get("stream_options") or {}
        include_usage = bool(opts.get("include_usage"))
        continuous = bool(opts.get("continuous_usage_stats"))
        self._headers_sent = True
        self.send_response_only(200)
        self.send_header("date", self.date_time_string())
        self.send_header("server", "uvicorn")
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        self._access(200)

        def event(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> None:
            body: dict[str, Any] = {"id": rid, "object": chunk_obj, "created": created,
                                    "model": model, "choices": choices}
            if usage is not None:
                body["usage"] = usage
            self._chunk("data: " + json.dumps(body, separators=(",", ":")) + "\n\n")

        completion_tokens = 0
        for idx in range(n):
            if chat:
                event([{"index": idx, "delta": {"role": "assistant", "content": ""},
                        "logprobs": None, "finish_reason": None}])
            elif echo:
                event([{"index": idx, "text": echo, "logprobs": None, "finish_reason": None,
                        "stop_reason": None}])
            count = 0
            for token, fin in eng.run(n_prompt, f"{seed}\x00{idx}", limit):
                usage = None
                if fin is None:
                    count += 1
                if continuous:
                    usage = {"prompt_tokens": n_prompt, "completion_tokens": count,
                             "total_tokens": n_prompt + count}
                if chat:
                    delta = {"content": token} if fin is None else {}
                    event([{"index": idx, "delta": delta, "logprobs": None,
                            "finish_reason": fin, **({} if fin is None else
                                                     {"stop_reason": None})}], usage)
                else:
                    event([{"index": idx, "text": token, "logprobs": None, "finish_reason": fin,
                            "stop_reason": None}], usage)
            completion_tokens += count
        if include_usage:
            event([], {"prompt_tokens": n_prompt, "total_tokens": n_prompt + completion_tokens,
                       "completion_tokens": completion_tokens})
        self._chunk("data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


# --------------------------------------------------------------------------- serve

class Stop(Exception):
    """SIGTERM/SIGINT arrived."""


def _is_hub_id(model: str) -> bool:
    return (not model.startswith(("/", ".", "~")) and model.count("/") == 1
            and not os.path.exists(model))


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _non_default(ns: argparse.Namespace) -> dict[str, Any]:
    """What vLLM logs as ``non-default args: {...}``."""
    plain = argparse.ArgumentParser(prog="vllm serve", allow_abbrev=False)
    _add_serve_args(plain)
    defaults = vars(plain.parse_args([]))
    return {k: v for k, v in vars(ns).items()
            if k != "subparser" and defaults.get(k, object()) != v}


def _traceback(log: Log, proc: str, where: str, frames: list[tuple[str, int, str, str]],
               final: str) -> None:
    lines = ["Traceback (most recent call last):"]
    for path, line, func, code in frames:
        lines.append(f'  File "{path}", line {line}, in {func}')
        lines.append(f"    {code}")
    lines.append(final)
    log.error(where, "\n".join(lines), proc=proc)


def serve(ns: argparse.Namespace, warnings: list[str], env: dict[str, str] | None = None,
          stop: threading.Event | None = None) -> int:
    """Run the stand-in server until SIGTERM/SIGINT (or ``stop``); returns the exit code."""
    env = dict(os.environ if env is None else env)
    stop = stop or threading.Event()
    log = Log()
    fail = env.get("VLLM_STANDIN_FAIL", "").strip().lower()
    cold = float(env.get("VLLM_STANDIN_COLD_START_S", "2") or 0)
    rate = float(env.get("VLLM_STANDIN_TOKENS_PER_S", "200") or 200)
    gpu_gib = float(env.get("VLLM_STANDIN_GPU_MEM_GIB", "79.19") or 79.19)
    engine_proc = "EngineCore_DP0"
    stamp = time.strftime("%m-%d %H:%M:%S")
    sys.stdout.write(f"INFO {stamp} [__init__.py:216] Automatically detected platform cuda.\n")
    log.warning(STANDIN_MARKER, "This is the gpufleet lab STAND-IN for `vllm serve`: no GPU, "
                "no model weights, deterministic text. It is not vLLM.")
    for w in warnings:
        log.warning("argparse_utils.py:1978", w)
    log.info("api_server.py:1839", f"vLLM API server version {_version()}")
    log.info("utils.py:233", f"non-default args: {_non_default(ns)}")

    model: str = ns.model
    if _is_hub_id(model):
        if _truthy(env.get("HF_HUB_OFFLINE")):
            snapshot = _offline_snapshot(model, ns.revision, env)
            if snapshot is None:
                _traceback(log, "APIServer", "api_server.py:1900", [
                    ("/usr/local/lib/python3.12/dist-packages/huggingface_hub/file_download.py",
                     1484, "_raise_on_head_call_error", "raise LocalEntryNotFoundError(")],
                    "huggingface_hub.errors.LocalEntryNotFoundError: Cannot find the requested "
                    "files in the disk cache and outgoing traffic has been disabled. To enable "
                    "hf.co look-ups and downloads online, set 'local_files_only' to False.")
                return 1
            log.info("hub.py:71", f"HF_HUB_OFFLINE=1: {model} found in the local Hugging Face "
                     f"cache at {snapshot} (stand-in: config.json read, weights not loaded)")
        elif not (env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN")):
            log.warning("hub.py:88", "Warning: You are sending unauthenticated requests to the "
                        "HF Hub. Please set a HF_TOKEN to enable higher rate limits and faster "
                        "downloads.")
    arch, max_pos, weights_gib = KNOWN_MODELS.get(model, DEFAULT_ARCH)
    log.info("model.py:547", f"Resolved architecture: {arch}")
    if ns.max_model_len == -1:  # --max-model-len auto
        ns.max_model_len = None
    if ns.max_model_len is not None and ns.max_model_len > max_pos:
        _traceback(log, "APIServer", "api_server.py:1900", [
            ("/usr/local/lib/python3.12/dist-packages/vllm/config/model.py", 1573,
             "get_and_verify_max_len", "raise ValueError(")],
            f"ValueError: User-specified max_model_len ({ns.max_model_len}) is greater than "
            f"the derived max_model_len (max_position_embeddings={max_pos} or "
            "model_max_length=None in model's config.json). To allow overriding this maximum, "
            "set the env var VLLM_ALLOW_LONG_MAX_MODEL_LEN=1. VLLM_ALLOW_LONG_MAX_MODEL_LEN "
            "must be used with extreme caution. If the model uses relative position encoding "
            "(RoPE), positions exceeding derived_max_model_len lead to nan. If the model uses "
            "absolute position encoding, positions exceeding derived_max_model_len will cause "
            "a CUDA array out-of-bounds error.")
        return 1
    ns.max_model_len = ns.max_model_len or max_pos
    log.info("model.py:1510", f"Using max model len {ns.max_model_len}")
    batched = ns.max_num_batched_tokens or 8192
    log.info("scheduler.py:205", f"Chunked prefill is enabled with max_num_batched_tokens="
             f"{batched}.")

    # vLLM binds the listening socket before the engine starts (so a busy port fails fast)
    # but only calls listen() once the model is loaded: until then connections are refused.
    host = ns.host or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, ns.port))
    except OSError as exc:
        sock.close()
        _traceback(log, "APIServer", "api_server.py:1880", [
            ("/usr/local/lib/python3.12/dist-packages/vllm/entrypoints/openai/api_server.py",
             1850, "setup_server", "sock = create_server_socket(sock_addr)")],
            f"OSError: [Errno {exc.errno}] {exc.strerror}")
        return 1

    def wait(seconds: float) -> None:
        if stop.wait(max(0.0, seconds)):
            raise Stop

    try:
        log.info("core.py:77", f"Initializing a V1 LLM engine (v{_version()}) with config: "
                 f"model='{model}', tokenizer='{ns.tokenizer or model}', dtype={ns.dtype}, "
                 f"max_seq_len={ns.max_model_len}, download_dir={ns.download_dir!r}, "
                 f"load_format={ns.load_format}, tensor_parallel_size="
                 f"{ns.tensor_parallel_size}, pipeline_parallel_size="
                 f"{ns.pipeline_parallel_size}, quantization={ns.quantization}, "
                 f"enforce_eager={bool(ns.enforce_eager)}, kv_cache_dtype={ns.kv_cache_dtype}, "
                 f"seed={ns.seed}, served_model_name={(ns.served_model_name or [model])[0]}, "
                 f"enable_prefix_caching={ns.enable_prefix_caching is not False}",
                 proc=engine_proc)
        if fail == "crash":
            wait(min(cold, 0.5))
            _traceback(log, engine_proc, "core.py:708", [
                ("/usr/local/lib/python3.12/dist-packages/vllm/v1/engine/core.py", 699,
                 "run_engine_core", "engine_core = EngineCoreProc(*args, **kwargs)"),
                ("/usr/local/lib/python3.12/dist-packages/vllm/platforms/cuda.py", 128,
                 "set_device", "torch.cuda.set_device(device)")],
                "RuntimeError: CUDA error: no CUDA-capable device is detected\n"
                "CUDA kernel errors might be asynchronously reported at some other API call, "
                "so the stacktrace below might be incorrect.")
            log.error("core.py:708", "EngineCore failed to start.", proc=engine_proc)
            _traceback(log, "APIServer", "api_server.py:1900", [
                ("/usr/local/bin/vllm", 10, "<module>", "sys.exit(main())"),
                ("/usr/local/lib/python3.12/dist-packages/vllm/v1/engine/utils.py", 852,
                 "wait_for_engine_startup", "raise RuntimeError(")],
                "RuntimeError: Engine core initialization failed. See root cause above. "
                "Failed core proc(s): {}")
            return 1
        log.info("gpu_model_runner.py:2602", f"Starting to load model {model}...",
                 proc=engine_proc)
        wait(cold * 0.6)
        log.info("default_loader.py:267", f"Loading weights took {cold * 0.6:.2f} seconds",
                 proc=engine_proc)
        log.info("gpu_model_runner.py:2653", f"Model loading took {weights_gib:.4f} GiB and "
                 f"{cold * 0.6:.6f} seconds", proc=engine_proc)
        if fail == "oom":
            wait(cold * 0.2)
            want = ns.gpu_memory_utilization * gpu_gib
            free = max(0.01, min(want - 1.0, gpu_gib * 0.35))
            _traceback(log, engine_proc, "core.py:708", [
                ("/usr/local/lib/python3.12/dist-packages/vllm/v1/engine/core.py", 83,
                 "__init__", "self.model_executor = executor_class(vllm_config)"),
                ("/usr/local/lib/python3.12/dist-packages/vllm/v1/worker/gpu_worker.py", 239,
                 "init_device", "raise ValueError(")],
                f"ValueError: Free memory on device ({free:.2f}/{gpu_gib:.2f} GiB) on startup "
                f"is less than desired GPU memory utilization ({ns.gpu_memory_utilization}, "
                f"{want:.2f} GiB). Decrease GPU memory utilization or reduce GPU memory used "
                "by other processes.")
            log.error("core.py:708", "EngineCore failed to start.", proc=engine_proc)
            log.error("api_server.py:1900", "torch.OutOfMemoryError: CUDA out of memory "
                      "(stand-in VLLM_STANDIN_FAIL=oom)")
            _traceback(log, "APIServer", "api_server.py:1900", [
                ("/usr/local/lib/python3.12/dist-packages/vllm/v1/engine/utils.py", 852,
                 "wait_for_engine_startup", "raise RuntimeError(")],
                "RuntimeError: Engine core initialization failed. See root cause above. "
                "Failed core proc(s): {}")
            return 1
        wait(cold * 0.4)
        log.info("core.py:210", f"init engine (profile, create kv cache, warmup model) took "
                 f"{cold * 0.4:.2f} seconds", proc=engine_proc)
        engine = Engine(ns, rate)
        keys = list(ns.api_key or [])
        if not keys and env.get("VLLM_API_KEY"):
            keys = [env["VLLM_API_KEY"]]
        app = App(ns, engine, keys, log, never_healthy=(fail == "never-healthy"))
        sock.listen(128)
        httpd = StandinHTTPServer(sock, app)
        port = sock.getsockname()[1]
        log.info("api_server.py:1634", "Supported_tasks: ['generate']")
        log.info("api_server.py:1912",
                 f"Starting vLLM API server 0 on http://{host}:{port}")
        log.info("launcher.py:34", "Available routes are:")
        for route, methods in ROUTES.items():
            log.info("launcher.py:42", f"Route: {route}, Methods: {', '.join(methods)}")
        log.uvicorn(f"Started server process [{os.getpid()}]")
        log.uvicorn("Waiting for application startup.")
        log.uvicorn("Application startup complete.")
        thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                  daemon=True)
        thread.start()
        dead_after: float | None = None
        if fail.startswith("engine-dead"):
            dead_after = float(fail.partition(":")[2] or 5)
        try:
            if dead_after is not None:
                wait(dead_after)
                engine.healthy = False
                log.error("core_client.py:564", "Engine core proc EngineCore_DP0 died "
                          "unexpectedly, shutting down client.")
                log.error("async_llm.py:480", "AsyncLLM output_handler failed.\n"
                          "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered "
                          "an issue. See stack trace (above) for the root cause.")
                time.sleep(0.2)
                _shutdown(log, httpd)
                return 0  # vLLM exits 0 after an EngineCore death (vllm#48966)
            while not stop.wait(3600):
                pass
            raise Stop
        except Stop:
            _shutdown(log, httpd)
            return 0
    except Stop:
        sock.close()
        log.info("launcher.py:99", "Shutting down during startup.")
        return 0


def _shutdown(log: Log, httpd: StandinHTTPServer) -> None:
    log.info("launcher.py:99", "Shutting down FastAPI HTTP server.")
    log.uvicorn("Shutting down")
    httpd.shutdown()
    httpd.server_close()
    log.uvicorn("Waiting for application shutdown.")
    log.uvicorn("Application shutdown complete.")


def _offline_snapshot(model: str, revision: str | None, env: Mapping[str, str]) -> str | None:
    """Where huggingface_hub would find ``model`` offline: the snapshot of ``revision`` (a commit,
    or a ref under refs/) in $HF_HOME/hub, holding config.json; None if it is not there."""
    home = env.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    repo = os.path.join(home, "hub", "models--" + model.replace("/", "--"))
    rev = revision or "main"
    ref = os.path.join(repo, "refs", rev)
    if os.path.isfile(ref):
        with open(ref, encoding="utf-8") as f:
            rev = f.read().strip()
    snapshot = os.path.join(repo, "snapshots", rev)
    return snapshot if os.path.isfile(os.path.join(snapshot, "config.json")) else None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns, warnings = parse_cli(argv)
    if ns.subparser != "serve":
        if ns.subparser is None:
            build_parser().print_help()
            return 0
        sys.stderr.write(f"vllm {ns.subparser}: not available in the gpufleet lab stand-in\n")
        return 2
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return serve(ns, warnings, stop=stop)


if __name__ == "__main__":
    sys.exit(main())
