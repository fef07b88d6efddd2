"""Secrets of a service: the Hugging Face token and the vLLM API key.

Two root-only files on each host (0600, in the 0700 ``/etc/gpufleet``), uploaded over SFTP:
never on a command line, in pyinfra's output, in ``--diff`` or a log.

* the server env file ``/etc/gpufleet/<service>.env`` (``server_env()``): ``VLLM_API_KEY`` only.
  The container mounts it and its entrypoint sources it; vLLM runs offline
  (``HF_HUB_OFFLINE=1``), so it never gets the Hub token.
* the Hub token file ``/etc/gpufleet/<service>.hf-token`` (``hub_token_file()``): ``HF_TOKEN``,
  read only by the host's weight staging. Absent when there is no token (a public model): a
  token that was set before is removed.

Both hold shell assignments (``KEY='value'``).
"""

from __future__ import annotations

import os
import re
import secrets as _random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pyinfra.api.exceptions import PyinfraError

MASK = "*****"


class Secret:
    """A secret string that never shows itself in ``str``, ``repr`` or f-strings."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret({MASK})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))


class SecretError(PyinfraError):
    """A secret is missing or unusable; the message says which and what to do."""


@dataclass(frozen=True)
class ServiceSecrets:
    hf_token: Secret | None
    api_key: Secret

    def server_env(self) -> Secret:
        """The server env file's content (what vLLM's process gets): the API key only."""
        return Secret(f"VLLM_API_KEY='{self.api_key.reveal()}'\n")

    def hub_token_file(self) -> Secret | None:
        """The Hub token file's content (read by the weight staging only); None: no token, the
        file must not exist."""
        if self.hf_token is None:
            return None
        return Secret(f"HF_TOKEN='{self.hf_token.reveal()}'\n")


def state_dir(environ: Mapping[str, str]) -> Path:
    """Where gpufleet keeps controller-side state (known_hosts, generated API keys)."""
    base = environ.get("GPUFLEET_STATE_DIR") or os.path.join(
        environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config"), "gpufleet")
    return Path(base)


def _check_value(name: str, value: str) -> str:
    if any(c.isspace() for c in value) or not value.isprintable() or "'" in value:
        raise SecretError(f"{name} contains whitespace, quotes or control characters; check how "
                          "it was set")
    return value


_BEARER = re.compile(r"[A-Za-z0-9._~+/-]+=*", re.ASCII)  # RFC 6750's b64token


def _check_bearer(value: str) -> str:
    if not _BEARER.fullmatch(value):
        raise SecretError("VLLM_API_KEY must be a bearer token: letters, digits and - . _ ~ + /, "
                          "then = padding (the front compares the Authorization header with it); "
                          "set another key")
    return value


def hf_token(environ: Mapping[str, str]) -> Secret | None:
    """The Hugging Face token from HF_TOKEN (or the older HUGGING_FACE_HUB_TOKEN)."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        value = environ.get(name)
        if value:
            return Secret(_check_value(name, value.strip()))
    return None


def api_key(service: str, environ: Mapping[str, str]) -> Secret:
    """The service's vLLM API key: VLLM_API_KEY if set, else one generated once per service and
    kept (0600) in the controller's state dir, so every run and every host use the same key."""
    given = environ.get("VLLM_API_KEY")
    if given:
        return Secret(_check_bearer(_check_value("VLLM_API_KEY", given.strip())))
    path = state_dir(environ) / "secrets" / f"{service}.api-key"
    try:
        return Secret(path.read_text(encoding="utf-8").strip())
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    value = "gf-" + _random.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another host's deploy made it first
        return Secret(path.read_text(encoding="utf-8").strip())
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(value + "\n")
    return Secret(value)


def api_key_path(service: str, environ: Mapping[str, str]) -> Path:
    return state_dir(environ) / "secrets" / f"{service}.api-key"
