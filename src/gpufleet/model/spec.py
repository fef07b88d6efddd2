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
import posixpath
import re
import unicodedata
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pyinfra.api.exceptions import PyinfraError

from gpufleet.model import image_cuda, names, vllm_flags
from gpufleet.model.gpus import compute_floor
from gpufleet.model.spec_fields import (
    DEFAULTS,
    FIELDS,
    SPEC_FIELDS,
    keys_of_type,
)
from gpufleet.model.vllm_args import QUANTIZATION_FLAGS, serve_args, spec_sizing_flags
from gpufleet.model.vllm_version import PINNED_IMAGE

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2")
KV_CACHE_MEMORY = ("auto", "planned")   # auto: vLLM sizes the KV cache; planned: the plan does
CGROUP_DRIVERS = ("cgroupfs", "systemd")

# Settings the lab (or a mirror) may point elsewhere through the environment.
ENVIRONMENT_OVERRIDES = {
    "toolkit_repo_url": "GPUFLEET_TOOLKIT_REPO_URL",
    "toolkit_key_url": "GPUFLEET_TOOLKIT_KEY_URL",
}

# Every pattern is used with fullmatch (``$`` would also match before a trailing newline) and
# re.ASCII (``\w`` would otherwise take any Unicode letter or digit).
_SERVICE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,39}", re.ASCII)
# Hugging Face repo ids (huggingface_hub.utils.validate_repo_id): namespace/name, no '--' or
# '..', '-' and '.' neither first nor last, at most 96 characters each
_MODEL_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}", re.ASCII)
# a branch, tag or commit: git's ref rules, narrowed to a safe alphabet
_REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._/-]{0,254}", re.ASCII)
_IMAGE = re.compile(
    r"(?P<repo>[a-z0-9]+(?:[._/-][a-z0-9]+)*(?::\d+/[a-z0-9._/-]+)?)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?",
    re.ASCII,
)
_APT_VERSION = re.compile(r"[0-9][A-Za-z0-9.+~:-]{0,63}", re.ASCII)
_DEB_PACKAGE = re.compile(r"[a-z0-9][a-z0-9.+-]{0,63}", re.ASCII)
_SERVED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+-]{0,127}", re.ASCII)
# no ':' (docker's -v separator), ',' (--mount's), '%' or '$' (systemd's specifiers)
_PATH = re.compile(r"/[A-Za-z0-9._@+/-]{0,4095}", re.ASCII)
# RFC 3986 characters less quotes and backslash ('$(ARCH)' is apt's, in NVIDIA's URL)
_URL = re.compile(r"https?://[A-Za-z0-9._~:/?#\[\]@!$&()*+,;=%-]{1,2048}", re.ASCII)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}", re.ASCII)

# Directories a models_dir / compile_cache_dir must not be (after normalization), and the trees
# it must not be inside of: the deploy creates the directory when missing and bind-mounts it
# read-write into the container.
SYSTEM_DIRS = frozenset({
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32",
    "/media", "/mnt", "/opt", "/proc", "/root", "/run", "/sbin", "/snap", "/srv", "/sys", "/tmp",
    "/usr", "/var", "/var/cache", "/var/lib", "/var/log", "/var/opt", "/var/spool", "/var/tmp",
})
SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc",
                "/sbin", "/sys", "/usr")

# container_env names gpufleet sets itself (the staged, offline Hugging Face cache; the secrets)
RESERVED_ENV = frozenset({
    "HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE",
    "HF_ENDPOINT", "VLLM_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
})
_SECRET_WORDS = ("TOKEN", "SECRET", "KEY", "PASSWORD")

MAX_SPEC_BYTES = 1024 * 1024  # a spec is a few hundred bytes; YAML parsing is slow past this
MAX_YAML_DEPTH = 8            # a spec nests two levels (container_env, extra_args)
MAX_YAML_NODES = 5000         # values in all; stops a file of a million tiny items early
MAX_ARG_LEN = 16384           # one extra_args element or container_env value
MAX_ITEMS = 256               # extra_args elements, container_env variables
MAX_TOTAL_LEN = 65536         # all of extra_args, all of container_env (systemd: 1 MiB a line)

# pyinfra's own data keys (connectors, global arguments) and the inventory's host data, which
# may appear in --data next to spec keys; anything else there is a typo pyinfra would ignore
PYINFRA_DATA_PREFIXES = ("ssh_", "winrm_", "docker_", "chroot_", "local_", "fake_", "podman_",
                         "terraform_", "vagrant_", "dockerssh_", "_", "gpufleet_")
INVENTORY_HOST_KEYS = ("droplet_id", "region", "size", "droplet_tags")


class SpecError(PyinfraError):
    """A service spec value is wrong; the message names the key and what to do."""


@dataclass(frozen=True)
class ServiceSpec:
    """A vLLM service as gpufleet deploys it. Field names are the YAML keys; each default is
    the one of spec_fields.SPEC_FIELDS (same order)."""

    service: str
    model: str
    image: str
    image_cuda: str = DEFAULTS["image_cuda"]
    revision: str = DEFAULTS["revision"]
    quantization: str = DEFAULTS["quantization"]
    kv_cache_dtype: str = DEFAULTS["kv_cache_dtype"]
    port: int = DEFAULTS["port"]
    bind_address: str = DEFAULTS["bind_address"]
    vllm_port: int = DEFAULTS["vllm_port"]
    tls_certificate: str | None = DEFAULTS["tls_certificate"]
    tls_key: str | None = DEFAULTS["tls_key"]
    metrics_from: tuple[str, ...] = DEFAULTS["metrics_from"]
    metrics_port: int = DEFAULTS["metrics_port"]
    ssh_from: tuple[str, ...] = DEFAULTS["ssh_from"]
    api_from: tuple[str, ...] = DEFAULTS["api_from"]
    lb_port: int | None = DEFAULTS["lb_port"]
    lb_check_interval: int = DEFAULTS["lb_check_interval"]
    lb_response_timeout: int = DEFAULTS["lb_response_timeout"]
    lb_healthy_threshold: int = DEFAULTS["lb_healthy_threshold"]
    lb_unhealthy_threshold: int = DEFAULTS["lb_unhealthy_threshold"]
    lb_idle_timeout: int = DEFAULTS["lb_idle_timeout"]
    served_model_name: str | None = DEFAULTS["served_model_name"]
    gpu_memory_utilization: float | None = DEFAULTS["gpu_memory_utilization"]
    kv_cache_memory: str = DEFAULTS["kv_cache_memory"]
    max_model_len: int | None = DEFAULTS["max_model_len"]
    max_num_seqs: int | None = DEFAULTS["max_num_seqs"]
    enable_prefix_caching: bool = DEFAULTS["enable_prefix_caching"]
    tensor_parallel_size: int | None = DEFAULTS["tensor_parallel_size"]
    extra_args: tuple[str, ...] = DEFAULTS["extra_args"]
    container_env: tuple[tuple[str, str], ...] = DEFAULTS["container_env"]
    gpu_count: int = DEFAULTS["gpu_count"]
    min_gpu_memory_mib: int = DEFAULTS["min_gpu_memory_mib"]
    cold_start_timeout: int = DEFAULTS["cold_start_timeout"]
    models_dir: str = DEFAULTS["models_dir"]
    compile_cache_dir: str = DEFAULTS["compile_cache_dir"]
    toolkit_version: str = DEFAULTS["toolkit_version"]
    toolkit_repo_url: str = DEFAULTS["toolkit_repo_url"]
    toolkit_key_url: str = DEFAULTS["toolkit_key_url"]
    docker_cgroup_driver: str | None = DEFAULTS["docker_cgroup_driver"]
    docker_package: str = DEFAULTS["docker_package"]

    # -- derived names -------------------------------------------------------------------------

    @property
    def name_served(self) -> str:
        return self.served_model_name or self.model

    @property
    def unit_name(self) -> str:
        return names.unit_name(self.service)

    @property
    def container_name(self) -> str:
        return names.container_name(self.service)

    @property
    def env_file(self) -> str:
        return names.env_file(self.service)

    @property
    def hf_token_file(self) -> str:
        """The root-only file holding HF_TOKEN for the weight staging (never the server's)."""
        return names.hf_token_file(self.service)

    @property
    def publish(self) -> str:
        """docker's ``-p`` value: vLLM on the host's loopback only, behind the front (vLLM's own
        key leaves routes open: ``gpufleet.model.front``)."""
        return f"127.0.0.1:{self.vllm_port}:{self.port}"

    @property
    def tls(self) -> bool:
        return self.tls_certificate is not None

    @property
    def min_compute_capability(self) -> tuple[int, int]:
        """The lowest compute capability this spec's quantization runs on
        (``gpufleet.model.gpus.COMPUTE_FLOORS``)."""
        return compute_floor(self.quantization).capability

    def vllm_args(self, gpu_count: int | None = None, revision: str | None = None,
                  sizing: list[str] | None = None) -> list[str]:
        """The arguments of ``vllm serve`` (``gpufleet.model.vllm_args.serve_args``)."""
        return serve_args(self, gpu_count=gpu_count, revision=revision, sizing=sizing)

    def sizing_args(self, gpu_count: int | None = None) -> list[str]:
        """The sizing flags as the spec states them (``gpufleet.model.vllm_args``; the
        planner computes them per host with the same builder)."""
        return spec_sizing_flags(self, gpu_count)

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["extra_args"] = list(self.extra_args)
        for key in ("metrics_from", "ssh_from", "api_from"):
            data[key] = list(getattr(self, key))
        data["container_env"] = dict(self.container_env)
        return data


SPEC_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ServiceSpec))
if SPEC_KEYS != tuple(f.name for f in SPEC_FIELDS):
    raise AssertionError("ServiceSpec's fields and spec_fields.SPEC_FIELDS differ")
_REQUIRED = tuple(f.name for f in SPEC_FIELDS if f.required)


def _suggest(word: object, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _show(value: object) -> str:
    """A value for a one-line message: repr (control characters escaped), cut short."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:70]}... ({len(text)} chars)"


def _bad_char(text: str) -> str | None:
    """The first control, format or line/paragraph separator character in ``text``, described
    for a message; None when there is none."""
    for c in text:
        if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp"):
            return f"character {c!r} (U+{ord(c):04X})"
    return None


# -- loading -------------------------------------------------------------------------------------


class _Refused(yaml.MarkedYAMLError):
    """YAML that parses but that a spec refuses (aliases, duplicate keys, deep nesting)."""


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader, bounded: no anchors or aliases (a spec needs none, and aliases are
    how a small file expands into gigabytes), no merge keys, no duplicate keys at any level,
    no nesting deeper than MAX_YAML_DEPTH, at most MAX_YAML_NODES values."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused(problem="YAML anchors and aliases (&name, *name) are not allowed in "
                           "a spec: write each value out", problem_mark=event.start_mark)
        self._depth += 1
        self._nodes += 1
        try:
            if self._nodes > MAX_YAML_NODES:
                raise _Refused(problem=f"has more than {MAX_YAML_NODES} values: a service spec "
                               "is a few lines", problem_mark=event.start_mark)
            if self._depth > MAX_YAML_DEPTH:
                raise _Refused(problem=f"nested deeper than {MAX_YAML_DEPTH} levels",
                               problem_mark=event.start_mark)
            return super().compose_node(parent, index)  # type: ignore[no-any-return]
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise _Refused(problem="YAML merge keys (<<) are not allowed in a spec",
                               problem_mark=key_node.start_mark)
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:
                raise _Refused(problem="a mapping key must be a plain value",
                               problem_mark=key_node.start_mark) from None
            line = key_node.start_mark.line + 1
            if first is not None:
                raise _Refused(problem=f"duplicate key {_show(key)} (first on line {first}): "
                               "each key once", problem_mark=key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)  # type: ignore[no-any-return]


def _yaml_problem(error: Exception) -> str:
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = " ".join(str(error.problem or error.context or "syntax error").split())
        return f"{problem}{where}"
    return " ".join(str(error).split(";")[0].split())[:200]


def load_spec_file(path: str | Path) -> dict[str, Any]:
    """Read a spec YAML file into a plain mapping (not yet validated). Bounded: at most
    MAX_SPEC_BYTES, UTF-8, no anchors/aliases, no duplicate keys."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)
    except OSError as e:
        raise SpecError(f"cannot read the service spec {path}: {e.strerror or e}") from e
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(f"{path} is larger than {MAX_SPEC_BYTES // 1024} KiB: a service spec is "
                        "a few lines of YAML; check that this is the right file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_SpecLoader)  # noqa: S506 (a bounded SafeLoader)
    except _Refused as e:
        raise SpecError(f"{path}: {_yaml_problem(e)}") from None
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        raise SpecError(f"{path} is not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path} must be a mapping of spec keys (service, model, image, ...)")
    return data


# -- data keys -----------------------------------------------------------------------------------


def _pyinfra_connector_keys() -> frozenset[str]:
    """The data keys pyinfra's installed connectors declare (ssh_user, docker_identifier, ...)."""
    from pyinfra.api.connectors import get_all_connectors

    keys: set[str] = set()
    for connector in get_all_connectors().values():
        keys.update(getattr(connector, "data_meta", None) or {})
    return frozenset(keys)


def check_data_keys(keys: Iterable[object], source: str = "--data") -> None:
    """Refuse a ``--data`` key that is neither a spec key nor one of pyinfra's or the
    inventory's own data keys: pyinfra would accept it silently and the spec would not see it.
    A pyinfra-looking key close to a spec key (``docker_pakage``) is refused as a typo too."""
    connector_keys = _pyinfra_connector_keys()
    for key in keys:
        name = str(key)
        if name in SPEC_KEYS or name in connector_keys or name in INVENTORY_HOST_KEYS:
            continue
        close = difflib.get_close_matches(name, SPEC_KEYS, n=1, cutoff=0.75)
        if name.startswith(PYINFRA_DATA_PREFIXES) and not close:
            continue
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise SpecError(f"{source} {_show(name)}: unknown key{hint} (spec keys: "
                        f"{', '.join(SPEC_KEYS)}; pyinfra's own keys start with "
                        f"{', '.join(PYINFRA_DATA_PREFIXES)})")


# -- building ------------------------------------------------------------------------------------


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
    merged: dict[Any, Any] = dict(data)
    for key, var in ENVIRONMENT_OVERRIDES.items():
        if environ and environ.get(var):
            merged[key] = environ[var]
    merged.update(overrides or {})

    unknown = [k for k in merged if k not in SPEC_KEYS]
    if unknown:
        key = unknown[0]
        raise SpecError(f"{source}: unknown key {_show(key)}{_suggest(key, SPEC_KEYS)} "
                        f"(known keys: {', '.join(SPEC_KEYS)})")
    missing = [k for k in _REQUIRED if merged.get(k) in (None, "")]
    if missing:
        raise SpecError(f"{source}: missing required key {missing[0]!r}")

    values = {k: _coerce(k, v, source) for k, v in merged.items()}
    spec = ServiceSpec(**values)
    _validate(spec, source)
    return spec


_INT_KEYS = keys_of_type("int")
_STR_KEYS = keys_of_type("str")
_PATH_KEYS = ("models_dir", "compile_cache_dir")
_NULLABLE = frozenset(f.name for f in SPEC_FIELDS if f.nullable or f.default is None)


def _coerce(key: str, value: Any, source: str) -> Any:
    """Type-check one value; accept the strings pyinfra's ``--data`` may hand over."""
    def fail(message: str) -> SpecError:
        return SpecError(f"{source}: {key} {message}")

    if value is None:
        if key in _NULLABLE:
            return None
        raise fail("must not be empty")
    if key in _INT_KEYS:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise fail(f"must be a whole number, got {_show(value)}")
        if isinstance(value, str) and not re.fullmatch(r"[0-9]{1,10}", value.strip(), re.ASCII):
            raise fail(f"must be a whole number, got {_show(value)}")
        return int(value)
    kind = FIELDS[key].type
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise fail(f"must be a number in (0, 1), got {_show(value)}")
        try:
            return float(value)
        except ValueError:
            raise fail(f"must be a number in (0, 1), got {_show(value)}") from None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise fail(f"must be true or false, got {_show(value)}")
    if kind == "args":
        return _coerce_extra_args(value, fail)
    if kind == "env":
        return _coerce_container_env(value, fail)
    if key in _STR_KEYS:
        # pyinfra's --data turns digits into an int (revision=1234567): take it back as text;
        # not a float, whose text may differ (1.10 -> 1.1)
        if isinstance(value, float):
            raise fail(f"must be a string, got the number {value!r} (quote it: "
                       f"--data '{key}=\"...\"' or {key}: \"...\" in YAML)")
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise fail(f"must be a string, got {_show(value)}")
        text = str(value)
        bad = _bad_char(text)  # each key's own shape below refuses spaces, with its reason
        if bad:
            raise fail(f"must not contain the {bad}, got {_show(text)}")
        if len(text) > 4096:
            raise fail(f"is {len(text)} characters long: at most 4096")
        if key in _PATH_KEYS:
            return _normalized_dir(key, text, fail)
        if key == "bind_address":
            return _canonical_address(text)
        return text
    return value


def _coerce_extra_args(value: Any, fail: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, (list, tuple)):
        raise fail(f"must be a list of strings, got {_show(value)}")
    if len(value) > MAX_ITEMS:
        raise fail(f"has {len(value)} elements: at most {MAX_ITEMS}")
    args = []
    for arg in value:
        # a YAML list may hold numbers as flag values (--max-num-batched-tokens, 4096)
        if isinstance(arg, bool) or not isinstance(arg, (str, int, float)):
            raise fail(f"must be a list of strings, got the element {_show(arg)}")
        text = str(arg)
        bad = _bad_char(text)
        if bad:
            raise fail(f"element {_show(text)} contains the {bad}: one element is one "
                       "argument, on one line")
        if len(text) > MAX_ARG_LEN:
            raise fail(f"has an element of {len(text)} characters: at most {MAX_ARG_LEN}")
        args.append(text)
    if sum(len(a) for a in args) > MAX_TOTAL_LEN:
        raise fail(f"is {sum(len(a) for a in args)} characters long: at most {MAX_TOTAL_LEN}")
    return tuple(args)


def _unique_pairs(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    result: dict[Any, Any] = {}
    for name, value in pairs:
        if name in result:
            raise ValueError(f"duplicate variable {_show(name)}")
        result[name] = value
    return result


def _coerce_container_env(value: Any, fail: Any) -> tuple[tuple[str, str], ...]:
    shape = "must be a mapping of environment variable names to strings"
    if isinstance(value, str):
        try:
            value = json.loads(value, object_pairs_hook=_unique_pairs)
        except (ValueError, RecursionError) as e:
            reason = str(e) if str(e).startswith("duplicate") else "not a JSON object"
            raise fail(f"{shape} ({reason}), got {_show(value)}") from None
    if isinstance(value, (list, tuple)) and all(isinstance(p, (list, tuple)) and len(p) == 2
                                                for p in value):
        try:
            value = _unique_pairs([tuple(p) for p in value])
        except (ValueError, TypeError) as e:
            raise fail(f"{shape}: {e}") from None
    if not isinstance(value, dict):
        raise fail(f"{shape}, got {_show(value)}")
    if len(value) > MAX_ITEMS:
        raise fail(f"has {len(value)} variables: at most {MAX_ITEMS}")
    pairs = []
    for name, text in value.items():
        if not isinstance(name, str):
            raise fail(f"has the variable name {_show(name)}: names are strings")
        if not isinstance(text, str):
            raise fail(f"value of {_show(name)} must be a string, got {_show(text)} (quote "
                       "it in YAML)")
        bad = _bad_char(text)
        if bad:
            raise fail(f"value of {_show(name)} contains the {bad}: a value is one line of "
                       "text")
        if len(text) > MAX_ARG_LEN:
            raise fail(f"value of {_show(name)} is {len(text)} characters long: at most "
                       f"{MAX_ARG_LEN}")
        pairs.append((name, text))
    if sum(len(n) + len(t) for n, t in pairs) > MAX_TOTAL_LEN:
        raise fail(f"is longer than {MAX_TOTAL_LEN} characters in all")
    return tuple(sorted(pairs))


def _canonical_address(text: str) -> str:
    """An IP address in its canonical text (``::0`` is ``::``); other text is left for
    _validate to refuse."""
    try:
        return str(ipaddress.ip_address(text)) if "%" not in text else text
    except ValueError:
        return text


def _normalized_dir(key: str, value: str, fail: Any) -> str:
    """An absolute host directory, normalized (``/opt/../root`` is ``/root``), of its own."""
    if not value.startswith("/"):
        raise fail(f"must be an absolute directory of its own such as /opt/models, "
                   f"got {_show(value)}")
    path = posixpath.normpath(value)
    if path.startswith("//"):  # normpath keeps a leading '//' (POSIX leaves it open)
        path = "/" + path.lstrip("/")
    if not _PATH.fullmatch(path):
        raise fail(f"may use only letters, digits, '.', '_', '-', '+', '@' and '/' (docker's -v "
                   f"takes ':' and ',' as separators), got {_show(value)}")
    if path in SYSTEM_DIRS or path.startswith(tuple(t + "/" for t in SYSTEM_TREES)):
        shown = path if path == value else f"{_show(value)}, which is {path}"
        raise fail(f"must be an absolute directory of its own such as /opt/models, not the "
                   f"system directory {shown}: the deploy creates it and mounts it read-write "
                   "into the container")
    return path


def _validate(spec: ServiceSpec, source: str) -> None:
    def fail(key: str, message: str) -> None:
        raise SpecError(f"{source}: {key} {message}")

    if not _SERVICE_NAME.fullmatch(spec.service):
        fail("service", f"must be lower-case letters, digits and '-' (at most 40), "
                        f"got {_show(spec.service)}: it names the unit, container and env file")
    if not _valid_model_id(spec.model):
        fail("model", f"must be a Hugging Face model id like 'meta-llama/Meta-Llama-3-8B-Instruct'"
                      f" (letters, digits, '-', '_', '.'; no '--' or '..'), got {_show(spec.model)}")
    if not _valid_revision(spec.revision):
        fail("revision", f"must be a branch, tag or commit of the model repo (letters, digits, "
                         f"'.', '_', '-', '/'; no '..'), got {_show(spec.revision)}")
    _validate_image_and_engine(spec, source, fail)
    if not 1 <= spec.port <= 65535:
        fail("port", f"must be between 1 and 65535, got {spec.port}")
    if spec.port == 22:
        fail("port", "must not be 22: that is the droplet's SSH port")
    try:
        address = ipaddress.ip_address(spec.bind_address)
    except ValueError:
        address = None
    if address is None or "%" in spec.bind_address or str(address) != spec.bind_address:
        fail("bind_address", f"must be an IP address such as 0.0.0.0 or 127.0.0.1, "
                             f"got {_show(spec.bind_address)}")
    _validate_front(spec, fail)
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
    if not _APT_VERSION.fullmatch(spec.toolkit_version):
        fail("toolkit_version", f"must be a Debian package version like '1.17.8-1', "
                                f"got {_show(spec.toolkit_version)}")
    for key in ("toolkit_repo_url", "toolkit_key_url"):
        value = getattr(spec, key)
        if not _URL.fullmatch(value) or re.search(r"%(?![0-9A-Fa-f]{2})", value) \
                or not urllib.parse.urlsplit(value).hostname:
            fail(key, f"must be an http(s) URL (no spaces, quotes or backslashes; %XX escapes), "
                      f"got {_show(value)}")
    if spec.docker_cgroup_driver is not None and spec.docker_cgroup_driver not in CGROUP_DRIVERS:
        fail("docker_cgroup_driver", f"must be one of {', '.join(CGROUP_DRIVERS)} or null, "
                                     f"got {_show(spec.docker_cgroup_driver)}")
    if not _DEB_PACKAGE.fullmatch(spec.docker_package):
        fail("docker_package", f"must be a Debian package name, got {_show(spec.docker_package)}")
    if spec.served_model_name is not None and not _SERVED_NAME.fullmatch(spec.served_model_name):
        fail("served_model_name", f"must be letters, digits and '.', '_', ':', '/', '+', '-' "
                                  f"(at most 128, starting with a letter or digit), "
                                  f"got {_show(spec.served_model_name)}")
    _validate_container_env(spec.container_env, fail)
    problem = vllm_flags.check_extra_args(spec.extra_args)
    if problem:
        fail("extra_args", problem)


def _validate_front(spec: ServiceSpec, fail: Any) -> None:
    """vLLM's loopback port, the front's TLS files and who may read its metrics."""
    if not 1 <= spec.vllm_port <= 65535 or spec.vllm_port == 22:
        fail("vllm_port", f"must be between 1 and 65535 and not 22, got {spec.vllm_port}")
    if spec.vllm_port == spec.port:
        fail("vllm_port", f"must differ from port ({spec.port}): the front listens on port and "
                          "vLLM behind it on 127.0.0.1:vllm_port")
    if not 1 <= spec.metrics_port <= 65535 or (spec.metrics_from and spec.metrics_port in (
            22, spec.port, spec.vllm_port)):  # no listener without metrics_from
        fail("metrics_port", f"must be between 1 and 65535 and not 22, port ({spec.port}) or "
                             f"vllm_port ({spec.vllm_port}), got {spec.metrics_port}")
    if (spec.tls_certificate is None) != (spec.tls_key is None):
        given, missing = (("tls_certificate", "tls_key") if spec.tls_key is None
                          else ("tls_key", "tls_certificate"))
        fail(missing, f"must be set together with {given} (the front's HTTPS needs both)")
    for key, marker in (("tls_certificate", "-----BEGIN CERTIFICATE-----"),
                        ("tls_key", "PRIVATE KEY-----")):
        path = getattr(spec, key)
        if path is None:
            continue
        try:
            text = Path(path).read_text(encoding="ascii", errors="replace")
        except OSError as e:
            fail(key, f"cannot be read on this machine ({path}: {e.strerror or e}); give the "
                      "path of a PEM file (relative paths are from the working directory)")
        if marker not in text:
            fail(key, f"is not a PEM file with a {marker.strip('-')} block: {path}")
    for key in ("metrics_from", "ssh_from", "api_from"):
        for network in getattr(spec, key):
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                fail(key, f"must list IP networks such as 10.110.0.0/20 or 192.0.2.7, "
                          f"got {_show(network)}")
    _validate_load_balancer(spec, fail)


LB_RANGES: dict[str, tuple[int, int]] = {
    "lb_port": (1, 65535), "lb_check_interval": (3, 300), "lb_response_timeout": (3, 300),
    "lb_healthy_threshold": (2, 10), "lb_unhealthy_threshold": (2, 10),
    "lb_idle_timeout": (30, 600),
}  # DigitalOcean's limits for the load balancer's settings


def _validate_load_balancer(spec: ServiceSpec, fail: Any) -> None:
    for key, (low, high) in LB_RANGES.items():
        value = getattr(spec, key)
        if value is not None and not low <= value <= high:
            fail(key, f"must be between {low} and {high}, got {value}")


def _validate_image_and_engine(spec: ServiceSpec, source: str, fail: Any) -> None:
    """The image, its CUDA build choice and the engine's memory and precision settings."""
    _validate_image(spec.image, source)
    if spec.image_cuda not in image_cuda.MODES:
        fail("image_cuda", f"must be one of {', '.join(image_cuda.MODES)}, got "
                           f"{_show(spec.image_cuda)}")
    if spec.image_cuda == image_cuda.MATCH_DRIVER and image_cuda.image_build(spec.image) is None:
        fail("image_cuda", f"match_driver needs a {image_cuda.REPOSITORY} version tag (such as "
                           f"{PINNED_IMAGE!r}) to pick each host's CUDA build, and image "
                           f"{spec.image!r} has none: pin such a tag or set image_cuda: pinned")
    if spec.quantization not in QUANTIZATION_FLAGS:
        fail("quantization", f"must be one of {', '.join(QUANTIZATION_FLAGS)}, got "
                             f"{_show(spec.quantization)}"
                             f"{_suggest(spec.quantization, tuple(QUANTIZATION_FLAGS))}")
    if spec.kv_cache_dtype not in KV_CACHE_DTYPES:
        fail("kv_cache_dtype", f"must be one of {', '.join(KV_CACHE_DTYPES)}, "
                               f"got {_show(spec.kv_cache_dtype)}")
    if spec.gpu_memory_utilization is not None and not 0.0 < spec.gpu_memory_utilization < 1.0:
        fail("gpu_memory_utilization",
             f"must be strictly between 0 and 1, got {spec.gpu_memory_utilization:g} "
             "(vLLM pre-allocates this share of each GPU; 1.0 leaves nothing for the CUDA "
             "context and fails at start; leave it unset for vLLM's default)")
    if spec.kv_cache_memory not in KV_CACHE_MEMORY:
        fail("kv_cache_memory", f"must be one of {', '.join(KV_CACHE_MEMORY)}, got "
                                f"{_show(spec.kv_cache_memory)}")


def _validate_container_env(env: tuple[tuple[str, str], ...], fail: Any) -> None:
    for name, _ in env:
        if not _ENV_NAME.fullmatch(name):
            fail("container_env", f"has an invalid variable name {_show(name)} (letters, digits "
                                  "and '_', not starting with a digit)")
        upper = name.upper()
        if upper in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "VLLM_API_KEY") or any(
                word in upper for word in _SECRET_WORDS):
            fail("container_env", f"must not set {name}: secrets go only into the root-only "
                                  "env file (export HF_TOKEN / VLLM_API_KEY on the controller)")
        if upper in RESERVED_ENV:
            fail("container_env", f"must not set {name}: gpufleet sets it (the container reads "
                                  "the weights staged at the pinned commit, offline)")


def _valid_model_id(model: str) -> bool:
    if not _MODEL_ID.fullmatch(model) or "--" in model or ".." in model:
        return False
    return all(part[0] not in "-." and part[-1] not in "-." for part in model.split("/")) \
        and not model.endswith(".git")


def _valid_revision(revision: str) -> bool:
    """git check-ref-format's rules (no '..', no '//', no component starting with '.', not
    ending in '/', '.' or '.lock'), on an alphabet without shell or systemd meaning; a commit
    id passes too."""
    return bool(_REVISION.fullmatch(revision)) and ".." not in revision \
        and "//" not in revision and "/." not in revision \
        and not revision.endswith(("/", ".", ".lock"))


def _validate_image(image: str, source: str) -> None:
    match = _IMAGE.fullmatch(image) if len(image) <= 512 else None
    if not match:
        raise SpecError(f"{source}: image {_show(image)} is not a docker image reference like "
                        f"{PINNED_IMAGE!r}")
    tag, digest = match.group("tag"), match.group("digest")
    if not tag and not digest:
        raise SpecError(f"{source}: image {image!r} has no tag: pin a release such as "
                        f"{PINNED_IMAGE!r} so a rebuild reproduces the same server")
    if tag == "latest" and not digest:
        raise SpecError(f"{source}: image {image!r} uses 'latest', which changes under you: "
                        f"pin a release such as {PINNED_IMAGE!r}")


def load_spec(
    path: str | Path,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ServiceSpec:
    """Load and validate the spec file at ``path`` with overrides applied."""
    data = load_spec_file(path)
    return build_spec(data, overrides=overrides, environ=environ, source=str(path))
