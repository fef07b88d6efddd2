"""Facts about a vLLM endpoint, probed from the host itself."""

from __future__ import annotations

import json

from pyinfra.api import FactBase, QuoteString, StringCommand
from typing_extensions import override

from gpufleet.model.names import VERIFY_SCRIPT


class VllmEndpoint(FactBase[dict]):
    """
    Returns one quick probe of the service's endpoint on the host (its front, ``url``):
    ``/health``, then ``/v1/models`` must list
    the served name, then a one-line chat completion with the API key read (on the host) from
    the env file. Always exits 0.

    .. code:: python

        {"ok": True, "stage": None, "detail": "served 'llama3-8b', completion: 'OK'"}
    """

    @override
    def command(self, url: str, served_name: str, env_file: str, container: str,
                unit: str, url_file: str | None = None) -> StringCommand:
        read = ["--url-file", QuoteString(url_file)] if url_file else []
        return StringCommand(
            "if [ -f", VERIFY_SCRIPT, "]; then", "python3", VERIFY_SCRIPT, "--quick",
            "--url", QuoteString(url), *read, "--served-name", QuoteString(served_name),
            "--env-file", QuoteString(env_file), "--container", QuoteString(container),
            "--unit", QuoteString(unit), "2>/dev/null", "||", "true;", "fi",
        )

    @staticmethod
    def default() -> dict:
        return {"ok": False, "stage": "missing", "detail": "the verification script is not there"}

    @override
    def process(self, output: list[str]) -> dict:
        for line in reversed(output):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict) and "ok" in value:
                return value
        return {"ok": False, "stage": "probe", "detail": " ".join(output)[:300]}
