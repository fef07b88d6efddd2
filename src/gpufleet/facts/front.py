"""The service's front on a host (nginx and gpufleet's files for it), read in one command."""

from __future__ import annotations

from pyinfra.api import FactBase, StringCommand
from typing_extensions import override

from gpufleet.facts.hostfiles import FileDigests

DEBIAN_DEFAULT_SITE = "/etc/nginx/sites-enabled/default"


class FrontState(FactBase[dict]):
    """
    Returns whether nginx is installed, active and enabled, whether Debian's default site is
    enabled, and the SHA-256, mode and owner of each of ``paths`` that exists.

    .. code:: python

        {"nginx": "/usr/sbin/nginx", "active": True, "enabled": True, "default_site": False,
         "files": {"/etc/nginx/conf.d/gpufleet-llama3.conf": {"sha256": "ab12...",
                                                              "mode": "644", "user": "root"}}}
    """

    @override
    def command(self, paths: list[str]) -> StringCommand:
        return StringCommand(
            "echo \"nginx=$(command -v nginx)\";",
            "echo \"active=$(systemctl is-active nginx 2>/dev/null)\";",
            "echo \"enabled=$(systemctl is-enabled nginx 2>/dev/null)\";",
            "if [ -e", DEBIAN_DEFAULT_SITE, "] || [ -L", DEBIAN_DEFAULT_SITE,
            "]; then echo default_site=yes; fi;", FileDigests().command(paths=paths),
        )

    @staticmethod
    def default() -> dict:
        return {"nginx": None, "active": False, "enabled": False, "default_site": False,
                "files": {}}

    @override
    def process(self, output: list[str]) -> dict:
        state = self.default()
        rest = []
        for line in output:
            key, _, value = line.partition("=")
            if key == "nginx" and " " not in line:
                state["nginx"] = value or None
            elif key == "active" and " " not in line:
                state["active"] = value == "active"
            elif key == "enabled" and " " not in line:
                state["enabled"] = value == "enabled"
            elif line == "default_site=yes":
                state["default_site"] = True
            else:
                rest.append(line)
        state["files"] = FileDigests().process(rest)
        return state
