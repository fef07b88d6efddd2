"""``--data key=value``: the one parser every gpufleet command uses, typing values as pyinfra's
own CLI does, so ``gpufleet check``, ``plan`` and ``rollout`` see what the deploy sees."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from pyinfra.api.exceptions import PyinfraError


class DataError(PyinfraError):
    """A ``--data`` argument is not ``key=value``."""


def parse_value(text: str) -> Any:
    """A value as ``pyinfra_cli.util.parse_cli_arg`` parses it: true/false, an integer, JSON,
    else the text (a copy: importing ``pyinfra_cli`` monkey-patches gevent)."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_data(pairs: Iterable[str]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise DataError(f"--data expects key=value, got {pair!r}")
        data[key] = parse_value(value)
    return data
