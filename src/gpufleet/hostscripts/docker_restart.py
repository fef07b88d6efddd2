#!/usr/bin/env python3
"""Restart docker for a new daemon.json; if docker refuses it, put the previous file back
(installed by gpufleet).

  --config PATH   the daemon.json just written (default /etc/docker/daemon.json)
  --wait SECS     how long docker may take to become active (default 20)

The daemon_json operation keeps the file it replaced as ``PATH.gpufleet-previous`` (or writes
``PATH.gpufleet-previous.absent`` when there was none). Docker is restarted; when the restart
fails or docker is not active within SECS, the line docker logged about the file is taken from
its journal, the refused file is moved to ``PATH.gpufleet-rejected``, the previous one restored
(or the new one removed), docker restarted again, and the units that needed docker and were
running are started again. Then one line says what docker refused, whether it is back up on the
previous file and what to do; exit 1. Standard library only: it runs with the host's python3.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

UNIT = "docker.service"
PREVIOUS = ".gpufleet-previous"
ABSENT = ".gpufleet-previous.absent"
REJECTED = ".gpufleet-rejected"
# what dockerd 20.10 .. 28 print when they refuse their configuration
REFUSAL_MARKERS = ("unable to configure the Docker daemon", "invalid character",
                   "the following directives")

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]


def run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=120)


def is_active(runner: Runner, unit: str = UNIT) -> bool:
    return runner(["systemctl", "is-active", unit]).stdout.strip() == "active"


def dependents(runner: Runner, unit: str = UNIT) -> list[str]:
    """Units that need ``unit`` (Requires=/BindsTo=) and are active now: a failed docker
    restart stops them, so they are started again afterwards."""
    out = runner(["systemctl", "show", unit, "-p", "RequiredBy", "-p", "BoundBy",
                  "--value"]).stdout
    names = sorted({n for n in out.split() if n.endswith(".service")})
    return [n for n in names if is_active(runner, n)]


def restart(runner: Runner, wait: float, unit: str = UNIT,
            sleep: Callable[[float], None] = time.sleep) -> bool:
    """``systemctl restart``, then active within ``wait`` seconds."""
    runner(["systemctl", "reset-failed", unit])
    if runner(["systemctl", "restart", unit]).returncode != 0:
        return False
    deadline = time.monotonic() + wait
    while True:
        if is_active(runner, unit):
            return True
        if time.monotonic() >= deadline:
            return False
        sleep(0.5)


def refusal_line(runner: Runner, since: float, unit: str = UNIT) -> str | None:
    """The last line docker logged about its configuration since ``since`` (epoch seconds)."""
    out = runner(["journalctl", "-u", unit, "-n", "50", "--no-pager", "-o", "cat",
                  "--since", f"@{int(since)}"]).stdout
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    for line in reversed(lines):
        if any(m in line for m in REFUSAL_MARKERS):
            return line
    for line in reversed(lines):  # anything dockerd said on its way out
        if "level=fatal" in line or "failed to start daemon" in line:
            return line
    return None


def restore(config: str) -> str:
    """Put the previous file back (or remove the new one); returns what was done."""
    previous, absent = config + PREVIOUS, config + ABSENT
    if os.path.exists(previous):
        if os.path.exists(config):
            shutil.copy2(config, config + REJECTED)
        tmp = config + ".gpufleet-restore"
        shutil.copy2(previous, tmp)
        os.replace(tmp, config)
        return f"restored the previous {config} (the refused one is kept as {config}{REJECTED})"
    if os.path.exists(absent):
        if os.path.exists(config):
            os.replace(config, config + REJECTED)
        return (f"removed {config}, as there was none before (the refused one is kept as "
                f"{config}{REJECTED})")
    return f"found no previous copy of {config} to restore (left it as it is)"


def main(argv: Sequence[str] | None = None, runner: Runner = run,
         sleep: Callable[[float], None] = time.sleep) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="/etc/docker/daemon.json")
    parser.add_argument("--wait", type=float, default=20.0)
    args = parser.parse_args(argv)
    config = args.config

    needed = dependents(runner)
    started = time.time() - 1
    if restart(runner, args.wait, sleep=sleep):
        for unit in needed:
            if not is_active(runner, unit):
                runner(["systemctl", "start", "--no-block", unit])
        print(f"docker restarted with {config}")
        return 0

    line = None
    for _ in range(6):  # journald may write the line a moment after systemctl returned
        line = refusal_line(runner, started)
        if line:
            break
        sleep(0.5)
    what = restore(config)
    back = restart(runner, args.wait, sleep=sleep)
    for unit in needed:
        if back and not is_active(runner, unit):
            runner(["systemctl", "start", "--no-block", unit])
    said = f"docker said: {line}" if line else (
        "docker logged no reason (see `journalctl -u docker`)")
    if back:
        outcome = f"gpufleet {what}; docker is running again."
    else:
        outcome = (f"gpufleet {what}, but docker is still NOT running: see `journalctl -u "
                   "docker` and `systemctl status docker`.")
    advice = ("Remove the conflicting setting (a dockerd flag in /etc/default/docker or a "
              "docker.service drop-in that sets the same option, or a key docker does not "
              "know) and re-run.")
    print(f"gpufleet: docker did not start with the new {config}: {said}. {outcome} {advice}",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
