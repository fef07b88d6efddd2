"""Facts about the releases recorded on a host (see ``gpufleet.model.release``).

The host side is ``hostscripts/release_records.py``; the operations in
``gpufleet.operations.release_records`` run it too. It is sent with each command
(:func:`script_command`), not installed: these facts run before a deploy has installed
anything on a fresh host, and ``gpufleet releases`` or a rollback may meet hosts deployed by an
older gpufleet, so the host always runs this controller's version of it. Hosts need
``python3``, as the run lock (``hostscripts/hostlock.py``) does already.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

from pyinfra.api import FactBase, HiddenValue, QuoteString, StringCommand
from typing_extensions import override

from gpufleet.model import names
from gpufleet.model import release as releases

SCRIPT = "release_records.py"


@functools.cache
def script() -> str:
    return resources.files("gpufleet.hostscripts").joinpath(SCRIPT).read_text("utf-8")


def script_command(subcommand: str, **options: str | int) -> StringCommand:
    """``python3 -c <release_records.py> SUBCOMMAND --option=value ...``, one shell command.

    The script travels as the ``-c`` argument: pyinfra passes no stdin to a fact's command
    (``_stdin`` is only an argument of an operation or of ``get_fact``'s caller), and the
    rollout driver's audit command runs outside any operation. The script's text is shown
    masked where pyinfra prints commands. ``--option=value`` keeps a value that starts with
    ``-`` a value."""
    body = QuoteString(HiddenValue(script(), f"<hostscripts/{SCRIPT}>"))
    args = [QuoteString(f"--{key.replace('_', '-')}={value}") for key, value in options.items()]
    return StringCommand("python3", "-I", "-S", "-c", body, subcommand, *args)


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
        return script_command("state", dir=releases.service_dir(service),
                              unit=releases.unit_path(service))

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
    def command(self) -> StringCommand:
        return script_command("services", root=names.STATE_ROOT)

    @staticmethod
    def default() -> list:
        return []

    @override
    def process(self, output: list[str]) -> list:
        return sorted({line.strip() for line in output if line.strip()})
