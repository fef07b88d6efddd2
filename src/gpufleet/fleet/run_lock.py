"""One gpufleet run at a time per service and host: the run lock, held as a lease.

Every kind of run takes it: a plain ``pyinfra ... deploys/llama3.py`` (when its deploy file is
defined for a host, before any operation runs), a rollout and a rollback (for the whole run).
The host side is ``hostscripts/hostlock.py``: a ``flock`` held by a process whose stdin is this
controller's SSH channel, so the lock lives exactly as long as the run (killed, crashed or
finished, the lock goes with it; no stale lock to break by hand). A second run refuses at once
naming the holder, or waits up to ``GPUFLEET_WAIT`` seconds.

A rollout holds the lock and then runs the deploy itself: a deploy in the process that holds a
host's lock for that service goes on under it (:func:`held_here`).
"""

from __future__ import annotations

import atexit
import os
import shlex
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from pyinfra.api import State, StringCommand
from pyinfra.api.arguments import CONNECTOR_ARGUMENT_KEYS, pop_global_arguments
from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.host import Host
from pyinfra.connectors.util import make_unix_command_for_host

from gpufleet.model import release as releases

WAIT_ENV = "GPUFLEET_WAIT"
PING_SECONDS = 10.0  # the host script releases after 120 s without a word
ANSWER_SECONDS = 10.0  # how long the host may take to answer AUDIT and RELEASE
# the controller sends the script over stdin: the host runs this controller's version of it
_BOOT = "import sys;exec(sys.stdin.read(int(sys.stdin.readline())))"


class LockError(PyinfraError):
    """The run lock could not be taken; the message says who holds it and what to do."""

    def __init__(self, message: str, holder: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.holder = holder


def script() -> str:
    return resources.files("gpufleet.hostscripts").joinpath("hostlock.py").read_text("utf-8")


def wait_seconds(environ: dict[str, str] | None = None) -> float:
    text = (environ if environ is not None else os.environ).get(WAIT_ENV, "").strip()
    if not text:
        return 0.0
    try:
        value = float(text)
    except ValueError:
        raise LockError(f"{WAIT_ENV}={text!r}: give the seconds to wait for a held lock, "
                        "e.g. 600") from None
    return max(0.0, value)


def describe(holder: dict[str, Any] | None) -> str:
    parsed = releases.LockHolder.from_doc(holder)
    if parsed is None:
        return "another gpufleet run (its holder file is unreadable)"
    return parsed.describe()


def keep_alive(stdin: Any, name: str) -> threading.Event:
    """Tell a host script every few seconds that the run lives (it ends after silence); set the
    returned event to stop."""
    done = threading.Event()

    def ping() -> None:
        while not done.wait(PING_SECONDS):
            try:
                stdin.write("PING\n")
                stdin.flush()
            except (OSError, EOFError, ValueError):
                return

    threading.Thread(target=ping, daemon=True, name=name).start()
    return done


@dataclass
class Lease:
    """A run lock held on one host: alive while its channel (or local process) is open."""

    host: str
    service: str
    holder: releases.LockHolder
    _stdin: Any = field(repr=False)
    _stdout: Any = field(repr=False)
    _close: Any = field(repr=False)
    _settimeout: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._done = keep_alive(self._stdin, f"gpufleet-lock-{self.host}")

    def _answer(self, line: str, timeout: float) -> str:
        """Send a line and read the host's answer; "" when it does not come in time (a host
        that vanished must not hang the run)."""
        if self._settimeout is not None:
            self._settimeout(timeout)
        try:
            self._stdin.write(line + "\n")
            self._stdin.flush()
            return str(self._stdout.readline()).strip()
        except (OSError, EOFError, ValueError):
            return ""

    def audit(self, line: str, timeout: float = ANSWER_SECONDS) -> bool:
        """Append one line to the service's audit log on the host, under the lock."""
        return self._answer(f"AUDIT {line}", timeout) == "AUDITED"

    def release(self, timeout: float = ANSWER_SECONDS) -> None:
        self._done.set()
        _HELD.pop((self.host, self.service), None)
        try:
            self._answer("RELEASE", timeout)
        finally:
            self._close()


_HELD: dict[tuple[str, str], Lease] = {}


def held_here(host_name: str, service: str) -> Lease | None:
    """The lease this process holds on ``host_name`` for ``service``, if any."""
    return _HELD.get((host_name, service))


def _command(state: State, host: Host, args: list[str]) -> str:
    arguments, _ = pop_global_arguments(state, host, {})
    connector_args = {k: v for k, v in arguments.items() if k in CONNECTOR_ARGUMENT_KEYS}
    for key in ("_timeout", "_get_pty", "_stdin", "_success_exit_codes", "_retries",
                "_retry_delay", "_retry_until"):
        connector_args.pop(key, None)
    command = StringCommand("python3", "-I", "-S", "-c", _quote(_BOOT), *map(_quote, args))
    return make_unix_command_for_host(state, host, command, **connector_args).get_raw_value()


def _quote(text: str) -> str:
    return shlex.quote(text)


def open_channel(state: State, host: Host, args: list[str],
          body: str | None = None) -> tuple[Any, Any, Any, Any] | None:
    """Start a host script (``body``, default hostlock.py) on its own channel: (stdin, stdout,
    close, settimeout), or None when this connector cannot hold a lease (``@fake`` hosts in
    tests, ``@docker`` ...)."""
    kind = type(getattr(host, "connector", None)).__name__
    raw = _command(state, host, args)
    body = script() if body is None else body
    payload = f"{len(body)}\n{body}"
    if kind == "SSHConnector":
        client = host.connector.client  # type: ignore[attr-defined]
        stdin, stdout, _stderr = client.exec_command(raw)
        stdin.write(payload)
        stdin.flush()

        def close() -> None:
            try:
                stdin.channel.close()
            except Exception:  # noqa: BLE001 - the connection may be gone already
                pass

        return stdin, stdout, close, stdin.channel.settimeout
    if kind == "LocalConnector":
        proc = subprocess.Popen(["sh", "-c", raw], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(payload)
        proc.stdin.flush()

        def close_local() -> None:
            try:
                assert proc.stdin is not None
                proc.stdin.close()
                proc.wait(timeout=10)
            except Exception:  # noqa: BLE001
                proc.kill()

        return proc.stdin, proc.stdout, close_local, None
    return None


def acquire(state: State, host: Host, service: str, holder: releases.LockHolder,
            wait: float = 0.0) -> Lease | None:
    """Take ``service``'s run lock on ``host`` (waiting up to ``wait`` seconds for a held one).

    Returns the lease (None where the connector cannot hold one); raises :class:`LockError`
    naming the holder when another run has it."""
    mine = held_here(host.name, service)
    if mine is not None:
        return mine
    args = ["hold", "--dir", releases.service_dir(service), "--holder", holder.to_json()]
    if wait:
        args += ["--wait", f"{wait:g}"]
    opened = open_channel(state, host, args)
    if opened is None:
        return None
    stdin, stdout, close, settimeout = opened
    while True:
        line = stdout.readline().strip()
        verb, _, rest = line.partition(" ")
        if verb == "WAITING":
            continue
        if verb == "LOCKED":
            lease = Lease(host.name, service, holder, stdin, stdout, close, settimeout)
            _HELD[(host.name, service)] = lease
            return lease
        close()
        if verb == "HELD":
            doc = releases.parse_json_line(rest)
            raise LockError(
                f"{host.name}: the {service} run lock is held by {describe(doc)}; nothing "
                f"changed. Wait for that run to end, or set {WAIT_ENV}=SECONDS to wait for it",
                holder=doc)
        raise LockError(f"{host.name}: could not take the {service} run lock"
                        + (f": {line}" if line else " (the host closed the connection)"))


def break_command(service: str) -> StringCommand:
    """A shell command that ends the run holding ``service``'s lock on a host (``--break-lock``:
    a run that hangs on the host). Prints ``BROKEN <holder>``."""
    body = script()
    return StringCommand(
        "printf", _quote("%s\\n%s"), str(len(body)), _quote(body), "|",
        "python3", "-I", "-S", "-c", _quote(_BOOT), "break", "--dir", _quote(releases.service_dir(service)))


def release_all() -> None:
    for lease in list(_HELD.values()):
        lease.release()


atexit.register(release_all)


def holder_json(lines: list[str]) -> dict[str, Any] | None:
    """The holder in a ``BROKEN``/``HELD`` line of the host script's output."""
    for line in lines:
        verb, _, rest = line.strip().partition(" ")
        if verb in ("BROKEN", "HELD"):
            return releases.parse_json_line(rest) or None
    return None




_DEFERRED = False


@contextmanager
def deferred() -> Iterator[None]:
    """Define deploys without taking the lock (a rollout's preflight learns each host's release
    and service first, then locks the hosts itself)."""
    global _DEFERRED
    before, _DEFERRED = _DEFERRED, True
    try:
        yield
    finally:
        _DEFERRED = before


def is_deferred() -> bool:
    return _DEFERRED
