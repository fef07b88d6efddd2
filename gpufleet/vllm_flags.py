"""The command-line flags of ``vllm serve`` in the pinned image, to catch misspellings early.

vLLM rejects an unknown flag only when the container starts, minutes into a deploy and after the
old server was stopped. gpufleet checks ``extra_args`` on the controller instead. The list below
is the ``vllm serve`` flag set of vLLM v0.11 (engine args + OpenAI server args); flags the spec
owns are refused in ``extra_args`` so there is one place for each setting.
"""

from __future__ import annotations

import difflib

# Flags that the spec sets itself: pass them through spec keys, not extra_args.
SPEC_OWNED: dict[str, str] = {
    "--model": "model",
    "--revision": "revision",
    "--served-model-name": "served_model_name",
    "--host": "bind_address",
    "--port": "port",
    "--gpu-memory-utilization": "gpu_memory_utilization",
    "--max-model-len": "max_model_len",
    "--max-num-seqs": "max_num_seqs",
    "--tensor-parallel-size": "tensor_parallel_size",
    "-tp": "tensor_parallel_size",
    "--quantization": "quantization",
    "-q": "quantization",
    "--dtype": "quantization",
    "--kv-cache-dtype": "kv_cache_dtype",
    "--enable-prefix-caching": "enable_prefix_caching",
    "--no-enable-prefix-caching": "enable_prefix_caching",
    "--download-dir": "models_dir",
}

# Secrets never go on a command line (they would show in `ps` and the unit file).
SECRET_FLAGS = ("--api-key", "--hf-token")

KNOWN_FLAGS: frozenset[str] = frozenset({
    # OpenAI-compatible server
    "--uvicorn-log-level", "--disable-uvicorn-access-log", "--allow-credentials",
    "--allowed-origins", "--allowed-methods", "--allowed-headers", "--lora-modules",
    "--chat-template", "--chat-template-content-format", "--response-role", "--ssl-keyfile",
    "--ssl-certfile", "--ssl-ca-certs", "--enable-ssl-refresh", "--ssl-cert-reqs",
    "--root-path", "--middleware", "--return-tokens-as-token-ids", "--disable-frontend-multiprocessing",
    "--enable-request-id-headers", "--enable-auto-tool-choice", "--tool-call-parser",
    "--tool-parser-plugin", "--reasoning-parser", "--log-config-file", "--max-log-len",
    "--disable-fastapi-docs", "--enable-prompt-tokens-details", "--enable-server-load-tracking",
    "--enable-force-include-usage", "--enable-tokenizer-info-endpoint", "--disable-log-requests",
    "--enable-log-requests", "--disable-log-stats", "--api-server-count", "--config",
    "--h11-max-incomplete-event-size", "--h11-max-header-count", "--uds",
    # model
    "--task", "--runner", "--convert", "--tokenizer", "--tokenizer-mode", "--trust-remote-code",
    "--seed", "--hf-config-path", "--allowed-local-media-path", "--code-revision",
    "--rope-scaling", "--rope-theta", "--tokenizer-revision", "--max-logprobs",
    "--logprobs-mode", "--disable-sliding-window", "--disable-cascade-attn", "--skip-tokenizer-init",
    "--enable-prompt-embeds", "--hf-overrides", "--enforce-eager", "--max-seq-len-to-capture",
    "--generation-config", "--override-generation-config", "--enable-sleep-mode",
    "--model-impl", "--override-attention-dtype", "--logits-processors", "--io-processor-plugin",
    "--pooler-config", "--override-pooler-config",
    # load
    "--load-format", "--model-loader-extra-config", "--ignore-patterns", "--use-tqdm-on-load",
    "--pt-load-map-location", "--safetensors-load-strategy",
    # parallel
    "--pipeline-parallel-size", "-pp", "--data-parallel-size", "-dp", "--data-parallel-rank",
    "--data-parallel-size-local", "--data-parallel-address", "--data-parallel-rpc-port",
    "--data-parallel-backend", "--data-parallel-hybrid-lb", "--enable-expert-parallel",
    "--enable-eplb", "--eplb-config", "--max-parallel-loading-workers",
    "--ray-workers-use-nsight", "--disable-custom-all-reduce", "--worker-cls",
    "--worker-extension-cls", "--enable-multimodal-encoder-data-parallel",
    "--distributed-executor-backend", "--decode-context-parallel-size",
    # cache
    "--block-size", "--swap-space", "--cpu-offload-gb", "--calculate-kv-scales",
    "--kv-cache-memory", "--kv-sharing-fast-prefill", "--mamba-cache-dtype",
    "--mamba-ssm-cache-dtype", "--prefix-caching-hash-algo", "--num-gpu-blocks-override",
    "--kv-offloading-size", "--kv-offloading-backend",
    # multimodal
    "--limit-mm-per-prompt", "--media-io-kwargs", "--mm-processor-kwargs",
    "--mm-processor-cache-gb", "--disable-mm-preprocessor-cache", "--mm-encoder-tp-mode",
    "--interleave-mm-strings", "--skip-mm-profiling",
    # lora
    "--enable-lora", "--enable-lora-bias", "--max-loras", "--max-lora-rank", "--lora-dtype",
    "--max-cpu-loras", "--fully-sharded-loras", "--default-mm-loras",
    # scheduler
    "--max-num-batched-tokens", "--max-num-partial-prefills", "--max-long-partial-prefills",
    "--long-prefill-token-threshold", "--num-lookahead-slots", "--scheduling-policy",
    "--enable-chunked-prefill", "--no-enable-chunked-prefill", "--disable-chunked-mm-input",
    "--scheduler-cls", "--disable-hybrid-kv-cache-manager", "--async-scheduling",
    "--cuda-graph-sizes",
    # observability, compilation, misc
    "--show-hidden-metrics-for-version", "--otlp-traces-endpoint", "--collect-detailed-traces",
    "--speculative-config", "--kv-transfer-config", "--kv-events-config",
    "--compilation-config", "-O", "--additional-config", "--structured-outputs-config",
    "--reasoning-parser-plugin", "--guided-decoding-backend",
    "--enable-log-outputs", "--headless", "--data-parallel-start-rank",
})


def _flag_name(arg: str) -> str:
    return arg.split("=", 1)[0]


def check_extra_args(args: tuple[str, ...] | list[str]) -> str | None:
    """Return a message for the first bad flag in ``args``, or None when they look right."""
    for arg in args:
        if not arg.startswith("-") or arg in ("-",):
            continue  # a value of the previous flag
        flag = _flag_name(arg)
        if flag in SECRET_FLAGS:
            return (f"must not contain {flag}: secrets never go on the command line; gpufleet "
                    "passes VLLM_API_KEY and HF_TOKEN through the root-only env file")
        if flag in SPEC_OWNED:
            return (f"must not contain {flag}: set the spec key {SPEC_OWNED[flag]!r} instead")
        if flag not in KNOWN_FLAGS:
            close = difflib.get_close_matches(flag, sorted(KNOWN_FLAGS | set(SPEC_OWNED)), n=1,
                                              cutoff=0.7)
            hint = ""
            if close:
                real = close[0]
                hint = f"; did you mean {real}?"
                if real in SPEC_OWNED:
                    hint += f" (set the spec key {SPEC_OWNED[real]!r} instead)"
            return f"has an unknown vLLM flag {flag}{hint} (vllm serve would refuse to start)"
    return None
