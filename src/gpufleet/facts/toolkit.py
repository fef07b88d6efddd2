"""Facts about the NVIDIA container toolkit's apt packages and sources."""

from __future__ import annotations

from pyinfra.api import FactBase, QuoteString, StringCommand
from typing_extensions import override

SOURCES_DIR = "/etc/apt/sources.list.d"


class DebVersions(FactBase[dict]):
    """
    Returns the installed version of each named Debian package (missing ones are left out).

    .. code:: python

        {"nvidia-container-toolkit": "1.17.8-1", "libnvidia-container1": "1.17.8-1"}
    """

    default = dict

    @override
    def command(self, packages: list[str]) -> StringCommand:
        return StringCommand(
            "dpkg-query", "-W", "-f", QuoteString("${Package} ${Version} ${db:Status-Abbrev}\\n"),
            *(QuoteString(p) for p in packages), "2>/dev/null", "||", "true",
        )

    @override
    def process(self, output: list[str]) -> dict:
        versions = {}
        for line in output:
            parts = line.split()
            # db:Status-Abbrev "ii" = installed; "rc" = removed, config files left
            if len(parts) >= 3 and parts[2].startswith("ii"):
                versions[parts[0]] = parts[1]
        return versions


class AptVersionKnown(FactBase[bool]):
    """
    Returns whether apt's package lists know ``package`` at ``version`` (so it can be installed
    without an ``apt-get update`` first).
    """

    @override
    def command(self, package: str, version: str) -> StringCommand:
        return StringCommand(
            "apt-cache", "show", QuoteString(f"{package}={version}"), ">/dev/null", "2>&1",
            "&&", "echo", "yes", "||", "echo", "no",
        )

    @staticmethod
    def default() -> bool:
        return False

    @override
    def process(self, output: list[str]) -> bool:
        return bool(output) and output[-1].strip() == "yes"


class NvidiaAptSources(FactBase[list]):
    """
    Returns the apt source files under ``/etc/apt/sources.list.d`` that point at NVIDIA's
    container repositories (current or legacy: libnvidia-container, nvidia-docker,
    nvidia-container-runtime) or at ``repo_url``; these conflict with a new ``signed-by`` entry
    ("Conflicting values set for option Signed-By").

    .. code:: python

        ["/etc/apt/sources.list.d/nvidia-docker.list"]
    """

    default = list

    @override
    def command(self, repo_url: str) -> StringCommand:
        return StringCommand(
            "grep", "-lsE",
            QuoteString("nvidia\\.github\\.io|libnvidia-container|nvidia-docker|"
                        "nvidia-container-runtime"),
            "-e", QuoteString(repo_url.replace("$(ARCH)", "")),
            f"{SOURCES_DIR}/*.list", f"{SOURCES_DIR}/*.sources", "||", "true",
        )

    @override
    def process(self, output: list[str]) -> list:
        return sorted(line.strip() for line in output if line.strip())
