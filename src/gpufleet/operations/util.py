"""Helpers shared by gpufleet's operations."""

from __future__ import annotations

from collections.abc import Iterator

from pyinfra.api import QuoteString, StringCommand


def fail_host(message: str) -> Iterator[StringCommand]:
    """Fail only the current host, printing ``message`` on its stderr.

    Raising in an operation body would abort the whole run; a failing command fails one host
    and lets the others carry on.
    """
    yield StringCommand("echo", QuoteString(f"gpufleet: {message}"), ">&2", "&&", "exit", "1")
