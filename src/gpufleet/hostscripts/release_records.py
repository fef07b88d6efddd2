#!/usr/bin/env python3
"""Read and change the releases of a service recorded on this host.

    release_records.py state        --dir DIR --unit UNIT_FILE
    release_records.py record       --dir DIR --unit UNIT_FILE --id ID --keep N
                                    --record JSON_LINE --unit-text TEXT --unit-sha256 SHA
    release_records.py activate     --dir DIR --id ID --keep N
    release_records.py restore-unit --dir DIR --unit UNIT_FILE --id ID [--owner USER:GROUP]
    release_records.py audit        --dir DIR --line JSON_LINE
    release_records.py services     --root ROOT

DIR is the service's state directory (``/var/lib/gpufleet/<service>``)::

    releases/<id>/unit            copy of the unit file of that release
    releases/<id>/release.json    its record, one line of JSON
    current -> releases/<id>      the release that passed the health gate last
    previous -> releases/<id>     the one before it
    lock, lock.holder.json        the run lock (hostlock.py) and who holds it
    audit.log                     one JSON line per host per rollout/rollback

``state`` prints, one per line: ``current=<target>``, ``previous=<target>``, ``release=<json>``
per record, ``lock=<holder json>`` while a run holds the lock and ``unit=<sha256>`` of the unit
file in place. ``record`` refuses (exit 1) when the unit file in place is not the one the run
wrote (``--unit-sha256``), writes the record once and makes it ``current``. ``activate`` makes a
recorded release ``current``; the one it replaces becomes ``previous`` (atomic symlink swaps),
then records beyond the ``--keep`` newest are removed, never ``current`` or ``previous``.
``services`` prints the services under ROOT that have releases.

The controller sends this script with each command (``python3 -c <script>``), so a host always
runs the controller's version of it and needs nothing installed. Standard library only.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import sys

RELEASES = "releases"
CURRENT = "current"
PREVIOUS = "previous"
RECORD = "release.json"
UNIT_COPY = "unit"
LOCK = "lock"
HOLDER = "lock.holder.json"
AUDIT = "audit.log"


class Refused(Exception):
    """A change this script will not make; the message goes to stderr, exit 1."""


def readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def file_sha256(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def lock_held(path: str) -> bool:
    """Whether a run holds the flock on ``path`` now: a holder file alone means nothing.
    Anything that keeps us from taking it counts as held, as ``flock -n`` failing would."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops the flock if we took it
    return False


def write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.new"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def symlink_atomic(target: str, path: str) -> None:
    tmp = f"{path}.new"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    os.symlink(target, tmp)
    os.replace(tmp, path)


def state(directory: str, unit_file: str) -> int:
    print(f"{CURRENT}={readlink(os.path.join(directory, CURRENT))}")
    print(f"{PREVIOUS}={readlink(os.path.join(directory, PREVIOUS))}")
    releases = os.path.join(directory, RELEASES)
    try:
        names = sorted(n for n in os.listdir(releases) if not n.startswith("."))
    except OSError:
        names = []
    for name in names:
        path = os.path.join(releases, name, RECORD)
        text = read_text(path) if os.path.isfile(path) else None
        if text is not None:
            print("release=" + text.rstrip("\n"))
    lock = os.path.join(directory, LOCK)
    if os.path.isfile(lock) and lock_held(lock):
        print("lock=" + (read_text(os.path.join(directory, HOLDER)) or "").rstrip("\n"))
    if os.path.isfile(unit_file):
        print("unit=" + (file_sha256(unit_file) or ""))
    return 0


def prune(directory: str, keep: int) -> None:
    """Remove records beyond the ``keep`` most recently touched, never current or previous."""
    releases = os.path.join(directory, RELEASES)
    entries = []
    for name in os.listdir(releases):
        if name.startswith("."):
            continue
        try:
            entries.append((-os.lstat(os.path.join(releases, name)).st_mtime_ns, name))
        except FileNotFoundError:
            continue
    pinned = {readlink(os.path.join(directory, CURRENT)),
              readlink(os.path.join(directory, PREVIOUS))}
    for _, name in sorted(entries)[keep:]:
        if f"{RELEASES}/{name}" in pinned:
            continue
        path = os.path.join(releases, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def activate(directory: str, release_id: str, keep: int) -> int:
    target = f"{RELEASES}/{release_id}"
    current_link = os.path.join(directory, CURRENT)
    current = readlink(current_link)
    if current != target:
        if current:
            symlink_atomic(current, os.path.join(directory, PREVIOUS))
        symlink_atomic(target, current_link)
    prune(directory, keep)
    return 0


def record(directory: str, unit_file: str, release_id: str, keep: int, record_line: str,
           unit_text: str, unit_sha256: str) -> int:
    # the record must describe what runs: the unit in place is the one this run rendered
    if file_sha256(unit_file) != unit_sha256:
        raise Refused(f"{unit_file} is not the unit this run wrote (release {release_id}): "
                      "it changed during the run; nothing recorded, re-run the deploy")
    release = os.path.join(directory, RELEASES, release_id)
    os.makedirs(release, exist_ok=True)
    if not os.path.isfile(os.path.join(release, RECORD)):
        write_atomic(os.path.join(release, UNIT_COPY), os.fsencode(unit_text))
        write_atomic(os.path.join(release, RECORD), os.fsencode(record_line + "\n"))
    os.utime(release)  # the newest record: pruning goes by this time
    return activate(directory, release_id, keep)


def restore_unit(directory: str, unit_file: str, release_id: str, owner: str | None) -> int:
    """Put the unit file of a recorded release in place (mode 0644, owned by ``owner``)."""
    source = os.path.join(directory, RELEASES, release_id, UNIT_COPY)
    with open(source, "rb") as f:
        data = f.read()
    tmp = f"{unit_file}.gpufleet.new"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        if owner:
            user, _, group = owner.partition(":")
            shutil.chown(tmp, user, group or None)
        os.replace(tmp, unit_file)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return 0


def audit(directory: str, line: str) -> int:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, AUDIT), "ab") as f:
        f.write(os.fsencode(line + "\n"))
    return 0


def services(root: str) -> int:
    try:
        names = sorted(n for n in os.listdir(root) if not n.startswith("."))
    except OSError:
        names = []
    for name in names:
        if os.path.isdir(os.path.join(root, name, RELEASES)):
            print(name)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="release_records.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("state")
    s.add_argument("--dir", required=True)
    s.add_argument("--unit", required=True)
    s = sub.add_parser("record")
    s.add_argument("--dir", required=True)
    s.add_argument("--unit", required=True)
    s.add_argument("--id", required=True)
    s.add_argument("--keep", type=int, required=True)
    s.add_argument("--record", required=True)
    s.add_argument("--unit-text", required=True)
    s.add_argument("--unit-sha256", required=True)
    s = sub.add_parser("activate")
    s.add_argument("--dir", required=True)
    s.add_argument("--id", required=True)
    s.add_argument("--keep", type=int, required=True)
    s = sub.add_parser("restore-unit")
    s.add_argument("--dir", required=True)
    s.add_argument("--unit", required=True)
    s.add_argument("--id", required=True)
    s.add_argument("--owner", help="USER:GROUP to give the unit file")
    s = sub.add_parser("audit")
    s.add_argument("--dir", required=True)
    s.add_argument("--line", required=True)
    s = sub.add_parser("services")
    s.add_argument("--root", required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        if a.command == "state":
            return state(a.dir, a.unit)
        if a.command == "record":
            return record(a.dir, a.unit, a.id, a.keep, a.record, a.unit_text, a.unit_sha256)
        if a.command == "activate":
            return activate(a.dir, a.id, a.keep)
        if a.command == "restore-unit":
            return restore_unit(a.dir, a.unit, a.id, a.owner)
        if a.command == "audit":
            return audit(a.dir, a.line)
        return services(a.root)
    except Refused as e:
        print(f"gpufleet: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        why = os.strerror(e.errno) if e.errno else str(e)
        print(f"gpufleet: release_records {a.command}: {e.filename or ''}: {why}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
