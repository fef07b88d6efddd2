"""Facts about the releases recorded on a host (see ``gpufleet.model.release``)."""

from __future__ import annotations

import shlex
from typing import Any

from pyinfra.api import FactBase, StringCommand
from typing_extensions import override

from gpufleet.model import names
from gpufleet.model import release as releases


class ReleaseState(FactBase[dict]):
    """
    Returns the releases of a service recorded on the host, in one command: the ``current``
    and ``previous`` release ids, every kept record, the run lock's holder (if held) and
    the SHA-256 of the unit file in place now.

    .. code:: python

        {
            "current": "3f2a9c1b7d4e", "previous": "9e8d7c6b5a4f",
            "releases": {"3f2a9c1b7d4e": {"id": "3f2a9c1b7d4e", "image": "...", ...}, ...},
            "locked": False, "lock": None,
            "unit_sha256": "5b1c...",
        }
    """

    @override
    def command(self, service: str) -> StringCommand:
        return StringCommand(" ".join((
            f"d={shlex.quote(releases.service_dir(service))};",
            f"u={shlex.quote(releases.unit_path(service))};",
            'echo "current=$(readlink "$d/current" 2>/dev/null)";',
            'echo "previous=$(readlink "$d/previous" 2>/dev/null)";',
            'for f in "$d"/releases/*/release.json; do',
            '[ -f "$f" ] && echo "release=$(cat "$f")";',
            "done;",
            # held only while the holder's flock is: a holder file alone means nothing
            'if [ -f "$d/lock" ] && ! flock -n "$d/lock" true 2>/dev/null; then',
            'echo "lock=$(cat "$d/lock.holder.json" 2>/dev/null)"; fi;',
            'if [ -f "$u" ]; then echo "unit=$(sha256sum < "$u" | cut -d" " -f1)"; fi;',
            "true",
        )))

    @staticmethod
    def default() -> dict:
        return empty_state()

    @override
    def process(self, output: list[str]) -> dict:
        return parse_state(output)


def empty_state() -> dict[str, Any]:
    return {"current": None, "previous": None, "releases": {}, "locked": False, "lock": None,
            "unit_sha256": None}


def _pointer(value: str) -> str | None:
    """``releases/<id>`` (a symlink's target) -> ``<id>``."""
    name = value.strip().rstrip("/").rsplit("/", 1)[-1]
    return name if releases.is_release_id(name) else None


def parse_state(output: list[str]) -> dict[str, Any]:
    state = empty_state()
    for line in output:
        key, sep, value = line.partition("=")
        if not sep:
            continue
        if key in ("current", "previous"):
            state[key] = _pointer(value)
        elif key == "release":
            doc = releases.parse_json_line(value)
            if doc and releases.is_release_id(str(doc.get("id", ""))):
                state["releases"][doc["id"]] = doc
        elif key == "lock":
            state["locked"] = True
            state["lock"] = releases.parse_json_line(value)
        elif key == "unit":
            state["unit_sha256"] = value.strip() or None
    return state


class RecordedServices(FactBase[list]):
    """
    Returns the services that have releases recorded on the host (``/var/lib/gpufleet/*``).

    .. code:: python

        ["llama3"]
    """

    @override
    def command(self) -> str:
        return (f"for d in {names.STATE_ROOT}/*/releases; do "
                '[ -d "$d" ] && basename "$(dirname "$d")"; done; true')

    @staticmethod
    def default() -> list:
        return []

    @override
    def process(self, output: list[str]) -> list:
        return sorted({line.strip() for line in output if line.strip()})
