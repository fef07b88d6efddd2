"""The service spec: the one place that knows the knobs of a vLLM service.

A spec is loaded from YAML (``deploys/llama3.yaml``), overridden by pyinfra host/group data and
``--data key=value``, and validated on the controller before any host is touched. Every error
names the key, says what was found and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pyinfra.api.exceptions import PyinfraError

from gpufleet import vllm_flags

# quantization -> the vLLM flag and value it maps to (None: let vLLM decide)
QUANTIZATION_FLAGS: dict[str, tuple[str, str] | None] = {
    "auto": None,
    "fp16": ("--dtype", "float16"),
    "bf16": ("--dtype", "bfloat16"),
    "fp8": ("--quantization", "fp8"),
    "awq": ("--quantization", "awq"),
    "gptq": ("--quantization", "gptq"),
}

# Minimum compute capability per quantization, from vLLM's docs: FP8 W8A8 needs Ada/Hopper (8.9),
# bfloat16 needs Ampere (8.0), and vLLM itself needs 7.0.
MIN_COMPUTE_CAPABILITY: dict[str, tuple[int, int]] = {
    "fp8": (8, 9),
    "bf16": (8, 0),
}
VLLM_MIN_COMPUTE_CAPABILITY = (7, 0)

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
CGROUP_DRIVERS = ("cgroupfs", "systemd")

NVIDIA_TOOLKIT_REPO_URL = "https://nvidia.github.io/libnvidia-container/stable/deb/$(ARCH)"
NVIDIA_TOOLKIT_KEY_URL = "https://nvidia.github.io/libnvidia-container/gpgkey"

# Settings the lab (or a mirror) may point elsewhere through the environment.
ENVIRONMENT_OVERRIDES = {
    "toolkit_repo_url": "GPUFLEET_TOOLKIT_REPO_URL",
    "toolkit_key_url": "GPUFLEET_TOOLKIT_KEY_URL",
}

_SERVICE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
_MODEL_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_IMAGE = re.compile(
    r"^(?P<repo>[a-z0-9]+(?:[._/-][a-z0-9]+)*(?::\d+/[a-z0-9._/-]+)?)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)
_APT_VERSION = re.compile(r"^[0-9][A-Za-z0-9.+~:-]*$")


class SpecError(PyinfraError):
    """A service spec value is wrong; the message names the key and what to do."""


@dataclass(frozen=True)
class ServiceSpec:
    """A vLLM service as gpufleet deploys it. Field names are the YAML keys."""

    service: str
    model: str
    image: str
    revision: str = "main"
    quantization: str = "auto"
    kv_cache_dtype: str = "auto"
    port: int = 8000
    bind_address: str = "0.0.0.0"
    served_model_name: str | None = None
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    enable_prefix_caching: bool = True
    tensor_parallel_size: int | None = None
    extra_args: tuple[str, ...] = ()
    container_env: tuple[tuple[str, str], ...] = ()
    gpu_count: int = 1
    min_gpu_memory_mib: int = 0
    cold_start_timeout: int = 1200
    models_dir: str = "/opt/models"
    compile_cache_dir: str = "/opt/vllm-cache"
    toolkit_version: str = "1.17.8-1"
    toolkit_repo_url: str = NVIDIA_TOOLKIT_REPO_URL
    toolkit_key_url: str = NVIDIA_TOOLKIT_KEY_URL
    docker_cgroup_driver: str | None = "cgroupfs"
    docker_package: str = "docker.io"

    # -- derived names -------------------------------------------------------------------------

    @property
    def name_served(self) -> str:
        return self.served_model_name or self.model

    @property
    def unit_name(self) -> str:
        return f"gpufleet-{self.service}.service"

    @property
    def container_name(self) -> str:
        return f"gpufleet-{self.service}"

    @property
    def env_file(self) -> str:
        return f"/etc/gpufleet/{self.service}.env"

    @property
    def min_compute_capability(self) -> tuple[int, int]:
        return MIN_COMPUTE_CAPABILITY.get(self.quantization, VLLM_MIN_COMPUTE_CAPABILITY)

    def vllm_args(self, gpu_count: int | None = None, revision: str | None = None,
                  sizing: list[str] | None = None) -> list[str]:
        """The arguments of ``vllm serve``: the model tag (positional; ``--model`` is deprecated
        since vLLM 0.11), then the flags. ``revision`` pins a resolved commit; ``sizing``
        replaces the spec's sizing flags (a plan's: tensor parallel, utilization, lengths,
        quantization, kv-cache dtype)."""
        args = [self.model, "--revision", revision or self.revision]
        args += ["--served-model-name", self.name_served]
        args += ["--host", "0.0.0.0", "--port", str(self.port)]
        args += self.sizing_args(gpu_count) if sizing is None else list(sizing)
        args.append("--enable-prefix-caching" if self.enable_prefix_caching
                    else "--no-enable-prefix-caching")
        args += list(self.extra_args)
        return args

    def sizing_args(self, gpu_count: int | None = None) -> list[str]:
        """The sizing flags as the spec states them (the planner computes them per host)."""
        args = ["--gpu-memory-utilization", _format_float(self.gpu_memory_utilization)]
        if self.max_model_len is not None:
            args += ["--max-model-len", str(self.max_model_len)]
        if self.max_num_seqs is not None:
            args += ["--max-num-seqs", str(self.max_num_seqs)]
        tp = self.tensor_parallel_size or gpu_count
        if tp and tp > 1:
            args += ["--tensor-parallel-size", str(tp)]
        quant = QUANTIZATION_FLAGS[self.quantization]
        if quant is not None:
            args += list(quant)
        if self.kv_cache_dtype != "auto":
            args += ["--kv-cache-dtype", self.kv_cache_dtype]
        return args

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["extra_args"] = list(self.extra_args)
        data["container_env"] = dict(self.container_env)
        return data


SPEC_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ServiceSpec))
_REQUIRED = ("service", "model", "image")


def _format_float(value: float) -> str:
    return f"{value:g}"


def _suggest(word: str, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def load_spec_file(path: str | Path) -> dict[str, Any]:
    """Read a spec YAML file into a plain mapping (not yet validated)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(f"cannot read the service spec {path}: {e.strerror}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise SpecError(f"{path} must be a mapping of spec keys (service, model, image, ...)")
    return data


def build_spec(
    data: Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    source: str = "spec",
) -> ServiceSpec:
    """Merge file data, environment settings and overrides, then validate into a ServiceSpec.

    Precedence, highest first: ``overrides`` (pyinfra ``--data``, host and group data), the
    environment (only the keys in ENVIRONMENT_OVERRIDES), the spec file, the defaults.
    """
    merged: dict[str, Any] = dict(data)
    for key, var in ENVIRONMENT_OVERRIDES.items():
        if environ and environ.get(var):
            merged[key] = environ[var]
    merged.update(overrides or {})

    unknown = [k for k in merged if k not in SPEC_KEYS]
    if unknown:
        key = unknown[0]
        raise SpecError(f"{source}: unknown key {key!r}{_suggest(key, SPEC_KEYS)} "
                        f"(known keys: {', '.join(SPEC_KEYS)})")
    missing = [k for k in _REQUIRED if merged.get(k) in (None, "")]
    if missing:
        raise SpecError(f"{source}: missing required key {missing[0]!r}")

    values = {k: _coerce(k, v, source) for k, v in merged.items()}
    spec = ServiceSpec(**values)
    _validate(spec, source)
    return spec


_INT_KEYS = {"port", "max_model_len", "max_num_seqs", "tensor_parallel_size", "gpu_count",
             "min_gpu_memory_mib", "cold_start_timeout"}
_STR_KEYS = {"service", "model", "image", "revision", "quantization", "kv_cache_dtype",
             "bind_address", "served_model_name", "models_dir", "compile_cache_dir",
             "toolkit_version", "toolkit_repo_url", "toolkit_key_url", "docker_cgroup_driver",
             "docker_package"}
_NULLABLE = {"served_model_name", "max_model_len", "max_num_seqs", "tensor_parallel_size",
             "docker_cgroup_driver"}


def _coerce(key: str, value: Any, source: str) -> Any:
    """Type-check one value; accept the strings pyinfra's ``--data`` may hand over."""
    if value is None:
        if key in _NULLABLE:
            return None
        raise SpecError(f"{source}: {key} must not be empty")
    if key in _INT_KEYS:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise SpecError(f"{source}: {key} must be a whole number, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise SpecError(f"{source}: {key} must be a whole number, got {value!r}") from None
    if key == "gpu_memory_utilization":
        if isinstance(value, bool):
            raise SpecError(f"{source}: {key} must be a number in (0, 1), got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise SpecError(f"{source}: {key} must be a number in (0, 1), got {value!r}") from None
    if key == "enable_prefix_caching":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise SpecError(f"{source}: {key} must be true or false, got {value!r}")
    if key == "extra_args":
        if isinstance(value, str):
            value = value.split()
        if not isinstance(value, (list, tuple)) or not all(isinstance(a, (str, int, float))
                                                           for a in value):
            raise SpecError(f"{source}: extra_args must be a list of strings, got {value!r}")
        return tuple(str(a) for a in value)
    if key == "container_env":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise SpecError(f"{source}: container_env must be a mapping of environment "
                                f"variables, got {value!r}") from None
        if isinstance(value, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2
                                                    for p in value):
            value = dict(value)
        if not isinstance(value, dict):
            raise SpecError(f"{source}: container_env must be a mapping of environment "
                            f"variables, got {value!r}")
        return tuple(sorted((str(k), str(v)) for k, v in value.items()))
    if key in _STR_KEYS:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise SpecError(f"{source}: {key} must be a string, got {value!r}")
        return str(value)
    return value


def _validate(spec: ServiceSpec, source: str) -> None:
    def fail(key: str, message: str) -> None:
        raise SpecError(f"{source}: {key} {message}")

    if not _SERVICE_NAME.match(spec.service):
        fail("service", f"must be lower-case letters, digits and '-' (at most 40), "
                        f"got {spec.service!r}: it names the unit, container and env file")
    if not _MODEL_ID.match(spec.model):
        fail("model", f"must be a Hugging Face model id like 'meta-llama/Meta-Llama-3-8B-Instruct',"
                      f" got {spec.model!r}")
    if not spec.revision.strip() or any(c.isspace() for c in spec.revision):
        fail("revision", f"must be a branch, tag or commit of the model repo, got {spec.revision!r}")
    _validate_image(spec.image, source)
    if spec.quantization not in QUANTIZATION_FLAGS:
        fail("quantization", f"must be one of {', '.join(QUANTIZATION_FLAGS)}, got "
                             f"{spec.quantization!r}{_suggest(spec.quantization, tuple(QUANTIZATION_FLAGS))}")
    if spec.kv_cache_dtype not in KV_CACHE_DTYPES:
        fail("kv_cache_dtype", f"must be one of {', '.join(KV_CACHE_DTYPES)}, "
                               f"got {spec.kv_cache_dtype!r}")
    if not 1 <= spec.port <= 65535:
        fail("port", f"must be between 1 and 65535, got {spec.port}")
    if spec.port == 22:
        fail("port", "must not be 22: that is the droplet's SSH port")
    try:
        ipaddress.ip_address(spec.bind_address)
    except ValueError:
        fail("bind_address", f"must be an IP address such as 0.0.0.0 or 127.0.0.1, "
                             f"got {spec.bind_address!r}")
    if not 0.0 < spec.gpu_memory_utilization < 1.0:
        fail("gpu_memory_utilization",
             f"must be strictly between 0 and 1, got {spec.gpu_memory_utilization:g} "
             "(vLLM pre-allocates this share of each GPU; 1.0 leaves nothing for the CUDA "
             "context and fails at start, 0.9 is vLLM's default)")
    for key in ("max_model_len", "max_num_seqs", "tensor_parallel_size"):
        value = getattr(spec, key)
        if value is not None and value < 1:
            fail(key, f"must be at least 1, got {value}")
    if spec.gpu_count < 1:
        fail("gpu_count", f"must be at least 1, got {spec.gpu_count}")
    if spec.tensor_parallel_size and spec.tensor_parallel_size > spec.gpu_count:
        fail("tensor_parallel_size", f"({spec.tensor_parallel_size}) cannot exceed gpu_count "
                                     f"({spec.gpu_count})")
    if spec.min_gpu_memory_mib < 0:
        fail("min_gpu_memory_mib", f"must not be negative, got {spec.min_gpu_memory_mib}")
    if spec.cold_start_timeout < 10:
        fail("cold_start_timeout", f"must be at least 10 seconds, got {spec.cold_start_timeout} "
                                   "(a vLLM cold start takes minutes)")
    for key in ("models_dir", "compile_cache_dir"):
        value = getattr(spec, key)
        if not value.startswith("/") or value.rstrip("/") in ("", "/etc", "/usr", "/var", "/root"):
            fail(key, f"must be an absolute directory of its own, got {value!r}")
    if not _APT_VERSION.match(spec.toolkit_version):
        fail("toolkit_version", f"must be a Debian package version like '1.17.8-1', "
                                f"got {spec.toolkit_version!r}")
    for key in ("toolkit_repo_url", "toolkit_key_url"):
        value = getattr(spec, key)
        if not re.match(r"^https?://[^\s'\"]+$", value):
            fail(key, f"must be an http(s) URL, got {value!r}")
    if spec.docker_cgroup_driver is not None and spec.docker_cgroup_driver not in CGROUP_DRIVERS:
        fail("docker_cgroup_driver", f"must be one of {', '.join(CGROUP_DRIVERS)} or null, "
                                     f"got {spec.docker_cgroup_driver!r}")
    if not re.match(r"^[a-z0-9][a-z0-9.+-]*$", spec.docker_package):
        fail("docker_package", f"must be a Debian package name, got {spec.docker_package!r}")
    if spec.served_model_name is not None and not spec.served_model_name.strip():
        fail("served_model_name", "must not be blank")
    for name, _ in spec.container_env:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", name):
            fail("container_env", f"has an invalid variable name {name!r}")
        if name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "VLLM_API_KEY") or "TOKEN" in name:
            fail("container_env", f"must not set {name}: secrets go only into the root-only "
                                  "env file (export HF_TOKEN / VLLM_API_KEY on the controller)")
    problem = vllm_flags.check_extra_args(spec.extra_args)
    if problem:
        fail("extra_args", problem)


def _validate_image(image: str, source: str) -> None:
    match = _IMAGE.match(image)
    if not match:
        raise SpecError(f"{source}: image {image!r} is not a docker image reference like "
                        "'vllm/vllm-openai:v0.11.0'")
    tag, digest = match.group("tag"), match.group("digest")
    if not tag and not digest:
        raise SpecError(f"{source}: image {image!r} has no tag: pin a release such as "
                        "'vllm/vllm-openai:v0.11.0' so a rebuild reproduces the same server")
    if tag == "latest" and not digest:
        raise SpecError(f"{source}: image {image!r} uses 'latest', which changes under you: "
                        "pin a release such as 'vllm/vllm-openai:v0.11.0'")


def load_spec(
    path: str | Path,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ServiceSpec:
    """Load and validate the spec file at ``path`` with overrides applied."""
    data = load_spec_file(path)
    return build_spec(data, overrides=overrides, environ=environ, source=str(path))
