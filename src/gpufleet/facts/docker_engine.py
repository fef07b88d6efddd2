"""Facts about the docker engine: installed, running, runtimes."""

from __future__ import annotations

from pyinfra.api import FactBase
from typing_extensions import override

_MISSING = "##GPUFLEET_NO_DOCKER##"


class DockerEngine(FactBase[dict]):
    """
    Returns whether docker is installed and its service active, and, when the daemon answers,
    its version, default runtime and registered runtimes. Always exits 0.

    .. code:: python

        {
            "installed": True,
            "active": True,
            "version": "28.2.2",
            "default_runtime": "nvidia",
            "runtimes": ["io.containerd.runc.v2", "nvidia", "runc"],
        }
    """

    @override
    def command(self) -> str:
        return (
            f"if ! command -v docker >/dev/null 2>&1; then echo '{_MISSING}'; exit 0; fi; "
            "echo \"active=$(systemctl is-active docker 2>/dev/null || true)\"; "
            "docker info --format "
            "'info={{.ServerVersion}} {{.DefaultRuntime}} {{range $k, $v := .Runtimes}}{{$k}},{{end}}'"
            " 2>/dev/null || true"
        )

    @staticmethod
    def default() -> dict:
        return {"installed": False, "active": False, "version": None, "default_runtime": None,
                "runtimes": []}

    @override
    def process(self, output: list[str]) -> dict:
        if not output or output[0] == _MISSING:
            return self.default()
        fact = {"installed": True, "active": False, "version": None, "default_runtime": None,
                "runtimes": []}
        for line in output:
            if line.startswith("active="):
                fact["active"] = line[len("active="):].strip() == "active"
            elif line.startswith("info="):
                parts = line[len("info="):].split()
                if parts:
                    fact["version"] = parts[0]
                if len(parts) > 1:
                    fact["default_runtime"] = parts[1]
                if len(parts) > 2:
                    fact["runtimes"] = sorted(r for r in parts[2].split(",") if r)
        return fact
