"""The run lock: the host script run for real here (flock on a temp dir), delivered over stdin
exactly as the controller sends it, and the fact that reads it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from gpufleet.facts.release_records import ReleaseState, parse_state
from gpufleet.fleet import run_lock as hostlock
from gpufleet.model import names
from gpufleet.model import release as releases


def holder(run_id: str, who: str = "alice@ctl") -> releases.LockHolder:
    return releases.LockHolder(id=run_id, command="deploy", who=who, pid=4242,
                               started="2026-12-01T10:00:00Z", hosts=3)


class Holder:
    """``python3 -c BOOT hold ...`` with the script on stdin, as hostlock._open starts it."""

    def __init__(self, directory: Path, h: releases.LockHolder, wait: float = 0,
                 expiry: float = 0) -> None:
        args = ["hold", "--dir", str(directory), "--holder", h.to_json()]
        if wait:
            args += ["--wait", str(wait)]
        if expiry:
            args += ["--expiry", str(expiry)]
        self.proc = subprocess.Popen(["python3", "-I", "-S", "-c", hostlock._BOOT, *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        body = hostlock.script()
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(f"{len(body)}\n{body}")
        self.proc.stdin.flush()

    def line(self) -> str:
        assert self.proc.stdout
        return self.proc.stdout.readline().strip()

    def send(self, text: str) -> None:
        assert self.proc.stdin
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def close(self) -> int:
        assert self.proc.stdin
        self.proc.stdin.close()
        return self.proc.wait(timeout=10)


def fact(root: Path) -> dict:
    out = subprocess.run(["sh", "-c", ReleaseState().command(service="llama3").get_raw_value()],
                         capture_output=True, text=True, check=True)
    return parse_state(out.stdout.splitlines())


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setattr(names, "STATE_ROOT", str(tmp_path / "var"))
    return tmp_path


def test_one_holder_at_a_time_the_second_is_told_who(root):
    d = Path(releases.service_dir("llama3"))
    first = Holder(d, holder("aaaa1111"))
    verb, _, doc = first.line().partition(" ")
    assert verb == "LOCKED" and json.loads(doc)["id"] == "aaaa1111"
    assert json.loads(doc)["host_pid"] == first.proc.pid
    st = fact(root)
    assert st["locked"] and st["lock"]["who"] == "alice@ctl"

    second = Holder(d, holder("bbbb2222", who="bob@ctl"))
    verb, _, doc = second.line().partition(" ")
    assert verb == "HELD" and json.loads(doc)["id"] == "aaaa1111"
    assert second.proc.wait(timeout=10) == 3
    assert "deploy aaaa1111 by alice@ctl (pid 4242)" in hostlock.describe(json.loads(doc))

    first.send('AUDIT {"rollout":"aaaa1111"}')
    assert first.line() == "AUDITED"
    assert first.close() == 0
    assert (d / "audit.log").read_text() == '{"rollout":"aaaa1111"}\n'
    assert not fact(root)["locked"] and not (d / "lock.holder.json").exists()


def test_the_lock_goes_with_a_run_killed_outright(root):
    d = Path(releases.service_dir("llama3"))
    first = Holder(d, holder("aaaa1111"))
    assert first.line().startswith("LOCKED ")
    os.kill(first.proc.pid, signal.SIGKILL)
    first.proc.wait(timeout=10)
    # its holder file is left behind, but it holds nothing: the kernel released the flock
    assert (d / "lock.holder.json").exists() and not fact(root)["locked"]
    again = Holder(d, holder("cccc3333"))
    assert again.line().startswith("LOCKED ")
    assert fact(root)["lock"]["id"] == "cccc3333"
    again.close()


def test_wait_takes_the_lock_once_the_holder_ends(root):
    d = Path(releases.service_dir("llama3"))
    first = Holder(d, holder("aaaa1111"))
    assert first.line().startswith("LOCKED ")
    waiter = Holder(d, holder("bbbb2222"), wait=20)
    assert waiter.line().startswith("WAITING ")
    t0 = time.monotonic()
    first.close()
    assert waiter.line().startswith("LOCKED ") and time.monotonic() - t0 < 5
    waiter.close()


def test_break_ends_a_hung_holder_and_says_whose_it_was(root):
    d = Path(releases.service_dir("llama3"))
    first = Holder(d, holder("aaaa1111"))
    assert first.line().startswith("LOCKED ")
    out = subprocess.run(["sh", "-c", hostlock.break_command("llama3").get_raw_value()],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert hostlock.holder_json(out.stdout.splitlines())["id"] == "aaaa1111"
    first.proc.wait(timeout=10)
    assert not fact(root)["locked"] and not (d / "lock.holder.json").exists()


def test_a_run_that_falls_silent_loses_the_lock_and_pings_keep_it(root):
    d = Path(releases.service_dir("llama3"))
    first = Holder(d, holder("aaaa1111"), expiry=1.5)
    assert first.line().startswith("LOCKED ")
    for _ in range(4):  # 2 s of pings: still held
        time.sleep(0.5)
        first.send("PING")
    assert fact(root)["locked"]
    assert first.proc.wait(timeout=10) == 0  # then silence: released by itself
    assert not fact(root)["locked"]


def flock_for(path: Path, seconds: float) -> subprocess.Popen:
    """A process that holds ``path``'s flock for ``seconds`` and writes no holder file."""
    code = ("import fcntl,os,sys,time;fd=os.open(sys.argv[1],os.O_RDWR|os.O_CREAT);"
            "fcntl.flock(fd,fcntl.LOCK_EX);print(flush=True);time.sleep(float(sys.argv[2]))")
    proc = subprocess.Popen(["python3", "-c", code, str(path), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout and proc.stdout.readline() == "\n"  # it holds the lock now
    return proc


def test_a_lock_probed_for_a_moment_does_not_refuse_a_run(root):
    """A reader that takes the flock for a moment (the ReleaseState fact, ``flock -n``) leaves
    no holder file: a run starting then waits that moment out instead of refusing."""
    d = Path(releases.service_dir("llama3"))
    d.mkdir(parents=True)
    probe = flock_for(d / "lock", 0.5)
    try:
        run = Holder(d, holder("aaaa1111"))
        assert run.line().startswith("LOCKED ")
        assert run.close() == 0
    finally:
        probe.wait(timeout=10)
    # a lock held past the grace, still without a holder file, is refused as held
    long = flock_for(d / "lock", 8)
    try:
        t0 = time.monotonic()
        refused = Holder(d, holder("bbbb2222"))
        assert refused.line() == "HELD {}" and refused.proc.wait(timeout=10) == 3
        assert time.monotonic() - t0 >= 2.5
    finally:
        long.kill()
        long.wait(timeout=10)


def test_wait_seconds_comes_from_the_environment():
    assert hostlock.wait_seconds({}) == 0
    assert hostlock.wait_seconds({"GPUFLEET_WAIT": "600"}) == 600
    with pytest.raises(hostlock.LockError, match="GPUFLEET_WAIT"):
        hostlock.wait_seconds({"GPUFLEET_WAIT": "soon"})
