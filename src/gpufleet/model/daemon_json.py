"""Pure merge of docker's daemon.json with the NVIDIA runtime. No pyinfra, no I/O."""

from __future__ import annotations

import json
from typing import Any

NVIDIA_RUNTIME_PATHS = ("nvidia-container-runtime", "/usr/bin/nvidia-container-runtime")
NVIDIA_RUNTIME = {"args": [], "path": "nvidia-container-runtime"}
CGROUP_DRIVER_OPT = "native.cgroupdriver="


class DaemonJsonError(ValueError):
    """daemon.json cannot be parsed or has the wrong shape."""


def parse(text: str | None, path: str = "/etc/docker/daemon.json") -> dict[str, Any]:
    """Parse daemon.json; a missing or empty file is an empty configuration."""
    if text is None or not text.strip():
        return {}
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DaemonJsonError(
            f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}). gpufleet left "
            "it untouched; docker would also refuse it at its next restart. Fix the file (or move "
            "it away) and re-run."
        ) from None
    if not isinstance(doc, dict):
        raise DaemonJsonError(f"{path} must hold a JSON object, found {type(doc).__name__}; "
                              "gpufleet left it untouched. Fix the file and re-run.")
    return doc


def merge(current: dict[str, Any], cgroup_driver: str | None = "cgroupfs") -> dict[str, Any]:
    """Return ``current`` with the nvidia runtime registered and made the default.

    Every other key is kept, in its order. An existing nvidia runtime entry that already points at
    nvidia-container-runtime is kept as it is (``nvidia-ctk`` writes it that way too). With
    ``cgroup_driver`` set, ``exec-opts`` gets ``native.cgroupdriver=<driver>`` (replacing another
    cgroupdriver option), the workaround NVIDIA documents for containers losing their GPUs on
    ``systemctl daemon-reload``.
    """
    merged = json.loads(json.dumps(current))  # deep copy, keeps key order
    runtimes = merged.get("runtimes")
    if not isinstance(runtimes, dict):
        runtimes = {}
    nvidia = runtimes.get("nvidia")
    if not (isinstance(nvidia, dict) and nvidia.get("path") in NVIDIA_RUNTIME_PATHS):
        runtimes["nvidia"] = dict(NVIDIA_RUNTIME)
    merged["runtimes"] = runtimes
    merged["default-runtime"] = "nvidia"
    if cgroup_driver:
        opts = merged.get("exec-opts")
        opts = [o for o in opts if isinstance(o, str)] if isinstance(opts, list) else []
        opts = [o for o in opts if not o.replace(" ", "").startswith(CGROUP_DRIVER_OPT)]
        opts.append(CGROUP_DRIVER_OPT + cgroup_driver)
        # keep the user's options first and ours last, but do not churn an equal list
        current_opts = current.get("exec-opts")
        if isinstance(current_opts, list) and sorted(current_opts) == sorted(opts):
            opts = list(current_opts)
        merged["exec-opts"] = opts
    return merged


def render(doc: dict[str, Any]) -> str:
    """Serialise like ``nvidia-ctk runtime configure`` does (4-space indent), newline-ended."""
    return json.dumps(doc, indent=4) + "\n"


def changed_keys(current: dict[str, Any], merged: dict[str, Any]) -> list[str]:
    return [k for k in merged if current.get(k) != merged.get(k)]
