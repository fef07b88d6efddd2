#!/usr/bin/env python3
"""Hold a service's run lock on this host for as long as the gpufleet run that took it lives.

    hostlock.py hold  --dir /var/lib/gpufleet/<service> --holder JSON [--wait SECONDS]
    hostlock.py break --dir /var/lib/gpufleet/<service>

Every kind of run (a plain deploy, a rollout, a rollback) takes the same lock, one per service
and host: ``flock`` on ``<dir>/lock``, with who holds it in ``<dir>/lock.holder.json``. The lock
is a lease: the controller starts ``hold`` over its own SSH connection and keeps its stdin open.
When the run ends, is killed, or loses the host, stdin reaches EOF (sshd closes it with the
session) and the lock is released; the kernel releases the ``flock`` even if this process is
killed, so a dead run never leaves a stale lock behind. A holder file without a held ``flock``
means nothing.

Protocol, one line each on stdout: ``LOCKED <holder>`` (taken), ``HELD <holder>`` (another run
has it; exit 3), ``WAITING <holder>`` (with ``--wait``, before waiting), ``RELEASED``. On stdin,
while held: ``AUDIT <json line>`` appends that line to ``<dir>/audit.log``; ``RELEASE`` or EOF
releases; the run sends ``PING`` every few seconds, and a holder that hears nothing for
``--expiry`` seconds releases too (a cut link can leave sshd's session open). A ``flock`` held
with no holder file for under ``NAMELESS_GRACE`` seconds (a reader probing it, a holder taking
or letting go) is waited out, not reported as held. ``break`` ends
the holding process named in the holder file and prints ``BROKEN <holder>``. The controller sends this script over stdin (``python3 -c BOOT``), so the
host always runs the controller's version of it. Standard library only.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import select
import signal
import sys
import time
from collections.abc import Iterator

LOCK = "lock"
HOLDER = "lock.holder.json"
AUDIT = "audit.log"
HELD_EXIT = 3
EXPIRY = 120.0  # seconds without a line from the run (it sends PING every 10 s)
# a flock held with no holder file is a moment, not a run: a holder between taking the lock and
# writing its file (or removing it and letting go), or a reader probing the lock (the
# ReleaseState fact, ``flock -n``); it is tried again for this long before it counts as held
NAMELESS_GRACE = 3.0


def say(line: str) -> None:
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # the run that reads us is gone
        raise SystemExit(0) from None


def read_holder(directory: str) -> dict:
    try:
        with open(os.path.join(directory, HOLDER), encoding="utf-8") as f:
            doc = json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise
    return True


def open_lock(directory: str) -> int:
    os.makedirs(directory, mode=0o755, exist_ok=True)
    return os.open(os.path.join(directory, LOCK), os.O_RDWR | os.O_CREAT, 0o644)


def write_holder(directory: str, doc: dict) -> None:
    path = os.path.join(directory, HOLDER)
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n")
    os.replace(tmp, path)


def release(directory: str, fd: int) -> None:
    """Remove the holder file while the lock is still ours, then let the lock go."""
    if read_holder(directory).get("host_pid") == os.getpid():
        try:
            os.unlink(os.path.join(directory, HOLDER))
        except FileNotFoundError:
            pass
    os.close(fd)


def lines(expiry: float) -> Iterator[str]:
    """Lines from the controller; stops at EOF, or when nothing (not even a ``PING``) came for
    ``expiry`` seconds: a run whose connection died without the host noticing (a cut link
    leaves sshd's session open) must not keep the lock for ever."""
    buf = b""
    while True:
        ready, _, _ = select.select([0], [], [], expiry)
        if not ready:
            print(f"hostlock: no word from the run for {expiry:g}s: released", file=sys.stderr)
            return
        chunk = os.read(0, 65536)
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line.decode("utf-8", "replace")


def serve(directory: str, expiry: float) -> None:
    """While held: append audit lines; return on RELEASE, EOF or silence (the run is gone)."""
    for line in lines(expiry):
        if line == "RELEASE":
            return
        if line.startswith("AUDIT "):
            with open(os.path.join(directory, AUDIT), "a", encoding="utf-8") as f:
                f.write(line[len("AUDIT "):] + "\n")
            say("AUDITED")


def hold(directory: str, holder: dict, wait: float, expiry: float = EXPIRY) -> int:
    fd = open_lock(directory)
    started = time.monotonic()
    deadline = started + wait
    said_waiting = False
    while not try_lock(fd):
        other = read_holder(directory)
        if not other and time.monotonic() - started < NAMELESS_GRACE:
            time.sleep(0.05)
            continue
        if time.monotonic() >= deadline:
            say("HELD " + json.dumps(other, sort_keys=True))
            return HELD_EXIT
        if not said_waiting:
            say("WAITING " + json.dumps(other, sort_keys=True))
            said_waiting = True
        time.sleep(0.5)
    write_holder(directory, {**holder, "host_pid": os.getpid(),
                             "host_started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    def on_term(signum: int, frame: object) -> None:
        release(directory, fd)
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    try:
        say("LOCKED " + json.dumps(read_holder(directory), sort_keys=True))
        serve(directory, expiry)
    finally:
        release(directory, fd)
    say("RELEASED")
    return 0


def break_lock(directory: str, timeout: float = 10.0) -> int:
    fd = open_lock(directory)
    holder = read_holder(directory)
    try:
        if try_lock(fd):
            say("BROKEN " + json.dumps({}))  # nobody held it
            return 0
        pid = holder.get("host_pid")
        if isinstance(pid, int) and pid > 1:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if try_lock(fd):
                say("BROKEN " + json.dumps(holder, sort_keys=True))
                return 0
            time.sleep(0.2)
        say("HELD " + json.dumps(holder, sort_keys=True))
        return HELD_EXIT
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hostlock.py", description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("hold", "break"))
    p.add_argument("--dir", required=True)
    p.add_argument("--holder", default="{}", help="JSON describing the run that holds the lock")
    p.add_argument("--wait", type=float, default=0.0, help="seconds to wait for a held lock")
    p.add_argument("--expiry", type=float, default=EXPIRY,
                   help="release when the run has said nothing for this long")
    a = p.parse_args(argv)
    if a.mode == "break":
        return break_lock(a.dir)
    try:
        holder = json.loads(a.holder)
    except ValueError:
        print("--holder is not JSON", file=sys.stderr)
        return 2
    return hold(a.dir, holder if isinstance(holder, dict) else {}, a.wait, a.expiry)


if __name__ == "__main__":
    sys.exit(main())
