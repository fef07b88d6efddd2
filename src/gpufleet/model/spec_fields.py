"""The keys of the service spec, one row each: name, type, default, what is checked, meaning.

``spec.py`` takes the dataclass defaults, the type dispatch of its validation and the list of
required and nullable keys from this table; ``scripts/readme_spec_table.py`` renders README.md's
spec table from it (a unit test keeps the two equal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gpufleet.model import image_cuda

NVIDIA_TOOLKIT_REPO_URL = "https://nvidia.github.io/libnvidia-container/stable/deb/$(ARCH)"
NVIDIA_TOOLKIT_KEY_URL = "https://nvidia.github.io/libnvidia-container/gpgkey"

# how a value is read (spec.py's _coerce): these names, and what the README calls them
TYPES: dict[str, str] = {
    "str": "string",
    "int": "whole number",
    "float": "number",
    "bool": "boolean",
    "args": "list of strings",
    "env": "mapping of strings",
}

REQUIRED = object()  # the default of a key the spec must set


@dataclass(frozen=True)
class SpecField:
    name: str
    type: str                 # a key of TYPES
    default: Any              # REQUIRED, or the value a spec without the key gets
    check: str                # what validation allows (markdown)
    doc: str                  # what the key means (markdown)
    nullable: bool = False    # null is a value (not only the default)
    shown_default: str = ""   # the default as the README says it, when not the value itself

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def default_text(self) -> str:
        if self.shown_default:
            return self.shown_default
        if self.required:
            return "required"
        if self.type == "bool":
            return f"`{str(self.default).lower()}`"
        if self.type == "args":
            return "`[]`"
        if self.type == "env":
            return "`{}`"
        return f"`{self.default}`"


_DIR_RULES = ("an absolute directory of its own, normalized (`/srv/a/../b` is `/srv/b`), letters, "
              "digits and `._-+@/`; `/`, top-level system directories (`/opt`, `/root`, "
              "`/var/lib`, ...) and anything under `/usr`, `/etc`, `/proc`, `/sys`, `/dev`, "
              "`/boot`, `/bin`, `/lib*` are refused")

SPEC_FIELDS: tuple[SpecField, ...] = (
    SpecField("service", "str", REQUIRED, "`a-z`, `0-9`, `-`, at most 40",
              "name: unit `gpufleet-<service>.service`, container `gpufleet-<service>`, env file "
              "`/etc/gpufleet/<service>.env`"),
    SpecField("model", "str", REQUIRED, "`organisation/name` (letters, digits, `-_.`)",
              "Hugging Face model id"),
    SpecField("image", "str", REQUIRED, "a tag other than `latest`, or a digest",
              "vLLM image, pinned"),
    SpecField("image_cuda", "str", image_cuda.PINNED,
              " or ".join(f"`{mode}`" for mode in image_cuda.MODES),
              f"the image is checked against each host's NVIDIA driver before the pull (a "
              f"`{image_cuda.REPOSITORY}` version tag: CUDA {image_cuda.CUDA_13_0.cuda} needs "
              f"driver >= {image_cuda.CUDA_13_0.driver_floor}; from v0.20.0 the `-cu129` tags "
              f"are CUDA {image_cuda.CUDA_12_9.cuda}, >= {image_cuda.CUDA_12_9.driver_floor}); "
              f"`{image_cuda.PINNED}`: a host with an older driver fails; "
              f"`{image_cuda.MATCH_DRIVER}`: it runs the tag of the same release its driver "
              "runs, pinned in its unit and release"),
    SpecField("revision", "str", "main", "a git ref or commit (letters, digits, `._/-`)",
              "branch, tag or commit of the model repository (`--revision`)"),
    SpecField("quantization", "str", "auto", "`auto`, `fp16`, `bf16`, `fp8`, `awq`, `gptq`",
              "`fp16`/`bf16`: `--dtype float16/bfloat16`; `fp8`, `awq`, `gptq`: "
              "`--quantization`"),
    SpecField("kv_cache_dtype", "str", "auto", "`auto`, `fp8`, `fp8_e4m3`, `fp8_e5m2`",
              "`--kv-cache-dtype`"),
    SpecField("port", "int", 8000, "1–65535, not 22",
              "the service's one port: the front (nginx) listens on it"),
    SpecField("bind_address", "str", "0.0.0.0", "an IP address",
              "host address the front listens on (`127.0.0.1` for local-only)"),
    SpecField("vllm_port", "int", 8001, "1–65535, not 22, not `port`",
              "host port vLLM is published on, on `127.0.0.1` only: only the front reaches it"),
    SpecField("tls_certificate", "str", None, "a PEM file on the controller, with `tls_key`",
              "the front serves HTTPS with this certificate (chain); unset: plain HTTP (keep "
              "it inside the VPC or behind the load balancer)", nullable=True,
              shown_default="unset"),
    SpecField("tls_key", "str", None, "a PEM private key file on the controller",
              "its private key, uploaded root-only (0600)", nullable=True,
              shown_default="unset"),
    SpecField("metrics_from", "args", (), "IP networks (`10.110.0.0/20`, `192.0.2.7`)",
              "who may read `/metrics` besides the host itself (a VPC or a monitoring range), "
              "on `metrics_port` only: the load balancer reaches `port` from inside the VPC, so "
              "`port` serves `/metrics` to the host alone; nobody else"),
    SpecField("metrics_port", "int", 8002, "1–65535; with `metrics_from`, not 22, `port`, `vllm_port`",
              "the front's `/metrics` listener for `metrics_from` (only when it is set)"),
    SpecField("ssh_from", "args", (), "IP networks",
              "who may reach SSH (port 22) through the DigitalOcean cloud firewall that "
              "`gpufleet cloud` manages (the operators' ranges); `gpufleet cloud` needs it"),
    SpecField("api_from", "args", (), "IP networks",
              "who may reach `port` directly through that firewall besides the load balancer; "
              "empty: only the load balancer"),
    SpecField("lb_port", "int", None, "1–65535",
              "the load balancer's port for clients; with TLS it passes TLS through to the "
              "hosts' front", nullable=True, shown_default="`80`, `443` with TLS"),
    SpecField("lb_check_interval", "int", 10, "3–300",
              "seconds between the load balancer's `/health` checks of each host"),
    SpecField("lb_response_timeout", "int", 5, "3–300", "seconds a health check may take"),
    SpecField("lb_healthy_threshold", "int", 3, "2–10",
              "passed checks before a host gets requests (the rollout waits this out)"),
    SpecField("lb_unhealthy_threshold", "int", 3, "2–10",
              "failed checks before a host gets no more requests"),
    SpecField("lb_idle_timeout", "int", 600, "30–600",
              "seconds a request may stay silent (vLLM's non-streamed answers outlive the 60 s "
              "default)"),
    SpecField("served_model_name", "str", None,
              "letters, digits, `._:/+-`, at most 128", "the name clients ask for",
              nullable=True, shown_default="the model id"),
    SpecField("gpu_memory_utilization", "float", None, "strictly between 0 and 1",
              "share of each GPU vLLM pre-allocates", nullable=True,
              shown_default="the image's vLLM's (0.92 from v0.21.0, 0.9 before)"),
    SpecField("kv_cache_memory", "str", "auto", "`auto` or `planned`",
              "`planned`: pass the host's plan's KV cache size as `--kv-cache-memory-bytes` "
              "(vLLM then allocates exactly that, whatever `gpu_memory_utilization` leaves; "
              "`gpufleet plan` shows the value); `auto`: vLLM sizes it at start"),
    SpecField("max_model_len", "int", None, "at least 1", "context length", nullable=True,
              shown_default="model's"),
    SpecField("max_num_seqs", "int", None, "at least 1", "concurrent sequences", nullable=True,
              shown_default="vLLM's"),
    SpecField("enable_prefix_caching", "bool", True, "`true` or `false`",
              "`--enable-prefix-caching` / `--no-enable-prefix-caching`"),
    SpecField("tensor_parallel_size", "int", None, "at least 1, at most `gpu_count`",
              "`--tensor-parallel-size` when above 1", nullable=True,
              shown_default="`gpu_count`"),
    SpecField("extra_args", "args", (),
              "as the pinned vLLM's `vllm serve` parser takes them (`vllm_serve_flags.json`, "
              "generated from it): known flags only, a value after each flag "
              "that takes one (`--x V`, `--x=V`) and after no switch (`--enforce-eager`, "
              "`--no-enforce-eager`), no bare words; flags the spec owns and secrets are "
              "refused", "more `vllm serve` flags"),
    SpecField("container_env", "env", (),
              "string names and string values (`VLLM_PORT: \"8001\"`), one line each; names "
              "gpufleet sets (`HF_HUB_OFFLINE`, `HF_HOME`, `HF_HUB_CACHE`, "
              "`HUGGINGFACE_HUB_CACHE`, `TRANSFORMERS_OFFLINE`, `HF_ENDPOINT`) and secrets "
              "(`*TOKEN*`, `*SECRET*`, `*KEY*`, `*PASSWORD*`) are refused",
              "extra environment of the container"),
    SpecField("gpu_count", "int", 1, "at least 1", "GPUs a host must have"),
    SpecField("min_gpu_memory_mib", "int", 0, "not negative", "memory each GPU must have"),
    SpecField("cold_start_timeout", "int", 1200, "at least 10",
              "seconds to wait for `/health` after a (re)start"),
    SpecField("models_dir", "str", "/opt/models", _DIR_RULES,
              "Hugging Face cache on the host; created (root, 0755) when missing, an existing "
              "one is never re-permissioned"),
    SpecField("compile_cache_dir", "str", "/opt/vllm-cache", _DIR_RULES,
              "vLLM's torch.compile cache on the host (`/root/.cache/vllm`), created like "
              "`models_dir`"),
    SpecField("toolkit_version", "str", "1.17.8-1", "a Debian package version",
              "version of the four NVIDIA container toolkit packages"),
    SpecField("toolkit_repo_url", "str", NVIDIA_TOOLKIT_REPO_URL,
              "an http(s) URL (no spaces, quotes or backslashes)",
              "apt repository (`GPUFLEET_TOOLKIT_REPO_URL` in the environment overrides it)",
              shown_default="NVIDIA's `stable/deb/$(ARCH)`"),
    SpecField("toolkit_key_url", "str", NVIDIA_TOOLKIT_KEY_URL,
              "an http(s) URL (no spaces, quotes or backslashes)",
              "its signing key (`GPUFLEET_TOOLKIT_KEY_URL` overrides it)",
              shown_default="NVIDIA's `gpgkey`"),
    SpecField("docker_cgroup_driver", "str", "cgroupfs", "`cgroupfs`, `systemd` or `null`",
              "`exec-opts` cgroup driver written to daemon.json (`null`: leave alone)",
              nullable=True),
    SpecField("docker_package", "str", "docker.io", "a Debian package name",
              "package installed when docker is missing"),
)

FIELDS: dict[str, SpecField] = {f.name: f for f in SPEC_FIELDS}
# the dataclass defaults (required keys have none)
DEFAULTS: dict[str, Any] = {f.name: f.default for f in SPEC_FIELDS if not f.required}


def keys_of_type(kind: str) -> frozenset[str]:
    return frozenset(f.name for f in SPEC_FIELDS if f.type == kind)


def markdown_table() -> str:
    """README.md's spec table: one row per key, in the table's order."""
    rows = ["| key | type | default | allowed | meaning |", "| --- | --- | --- | --- | --- |"]
    for f in SPEC_FIELDS:
        kind = TYPES[f.type] + (" or null" if f.nullable else "")
        rows.append(f"| `{f.name}` | {kind} | {f.default_text()} | {f.check} | {f.doc} |")
    return "\n".join(rows) + "\n"
