"""Facts about small files gpufleet installs on hosts (its host scripts)."""

from __future__ import annotations

from pyinfra.api import FactBase, QuoteString, StringCommand
from typing_extensions import override


class FileDigests(FactBase[dict]):
    """
    Returns, in one command, the SHA-256, mode and owner of each path that exists.

    .. code:: python

        {"/usr/local/lib/gpufleet/verify_endpoint.py": {"sha256": "ab12...", "mode": "755",
                                                        "user": "root"}}
    """

    default = dict

    @override
    def command(self, paths: list[str]) -> StringCommand:
        quoted = [QuoteString(p) for p in paths]
        return StringCommand(
            "for f in", *quoted, "; do [ -f \"$f\" ] && echo",
            "\"$(sha256sum \"$f\" | cut -d' ' -f1) $(stat -c '%a %U' \"$f\") $f\"; done; true",
        )

    @override
    def process(self, output: list[str]) -> dict:
        digests = {}
        for line in output:
            parts = line.split(" ", 3)
            if len(parts) == 4:
                digests[parts[3]] = {"sha256": parts[0], "mode": parts[1], "user": parts[2]}
        return digests
