"""The host-side weight staging script against the Hub emulator: HF cache layout, resume after a
cut connection, nothing downloaded twice, a new revision fetches only what changed; one staging
per model at a time (a second waits and resumes), the stager stops with the run that started it,
a full disk is not retried, sizes in units that fit."""

from __future__ import annotations

import errno
import importlib.util
import io
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from gpufleet.clients import hub
from gpufleet.facts.weights import marker_path
from gpufleet_lab import hub_emulator as he
from gpufleet_lab import tinymodel

SCRIPT = Path(__file__).resolve().parents[2] / "src/gpufleet/hostscripts/stage_weights.py"
spec = importlib.util.spec_from_file_location("stage_weights", SCRIPT)
stage_weights = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stage_weights)  # type: ignore[union-attr]
MODEL = he.REPO_GATED


@pytest.fixture
def hub_server(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("GPUFLEET_STATE_DIR", str(tmp_path / "state"))
    server = he.make_hub_server("127.0.0.1", 0)
    server.start_background()
    monkeypatch.setenv("HF_ENDPOINT", he.base_url(server))
    yield server
    server.close()


def stats(server) -> dict:
    with urllib.request.urlopen(he.base_url(server) + "/_lab/stats") as r:
        return json.load(r)


def manifest(server, revision: str) -> dict:
    shape = hub.model_shape(MODEL, revision, he.GOOD_TOKEN, he.base_url(server))
    return {"model": MODEL, "commit": shape.commit, "revision": revision,
            "files": [{k: f[k] for k in ("path", "size", "sha256", "blob_id") if k in f}
                      for f in shape.files]}


def test_stage_resume_and_no_second_download(hub_server, tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    m = manifest(hub_server, "main")
    size = sum(f["size"] for f in m["files"])
    before = stats(hub_server)["total_bytes"]
    # the first download of the weights is cut after 1 MB: the script resumes with Range
    req = urllib.request.Request(he.base_url(hub_server) + "/_lab/faults", method="POST",
                                 data=json.dumps({"cut_after_bytes": 1_000_000, "count": 1,
                                                  "path": "*.safetensors"}).encode())
    urllib.request.urlopen(req).close()
    assert stage_weights.stage(m, he.base_url(hub_server), he.GOOD_TOKEN, str(models)) == 0
    after = stats(hub_server)
    assert after["downloads"]["cut"] == 1
    assert after["total_bytes"] - before == size  # the cut 1 MB was not fetched again
    repo = models / "hub" / f"models--{MODEL.replace('/', '--')}"
    snap = repo / "snapshots" / tinymodel.COMMIT_MAIN
    assert (snap / "config.json").is_symlink() and (snap / "model.safetensors").is_file()
    assert (repo / "refs" / "main").read_text() == tinymodel.COMMIT_MAIN
    assert Path(marker_path(str(models), MODEL, tinymodel.COMMIT_MAIN)).is_file()
    # again: nothing to download
    assert stage_weights.stage(m, he.base_url(hub_server), he.GOOD_TOKEN, str(models)) == 0
    assert stats(hub_server)["total_bytes"] == after["total_bytes"]
    # another revision: only the file that differs travels
    n = manifest(hub_server, "next")  # (the controller reads config.json: not staging bytes)
    baseline = stats(hub_server)["total_bytes"]
    assert stage_weights.stage(n, he.base_url(hub_server), he.GOOD_TOKEN, str(models)) == 0
    moved = stats(hub_server)["total_bytes"] - baseline
    changed = {f["path"]: f["size"] for f in n["files"]}["generation_config.json"]
    assert moved == changed
    assert (repo / "snapshots" / tinymodel.COMMIT_NEXT / "model.safetensors").resolve() == \
        (snap / "model.safetensors").resolve()


def test_gated_without_token_fails_clearly(hub_server, tmp_path, capsys):
    m = manifest(hub_server, "main")
    assert stage_weights.stage(m, he.base_url(hub_server), None, str(tmp_path)) == 1
    assert "HTTP 401" in capsys.readouterr().err


def test_not_enough_disk_space(hub_server, tmp_path, capsys, monkeypatch):
    m = manifest(hub_server, "main")
    monkeypatch.setattr(stage_weights.shutil, "disk_usage",
                        lambda p: type("Usage", (), {"free": 1000})())
    assert stage_weights.stage(m, he.base_url(hub_server), he.GOOD_TOKEN, str(tmp_path)) == 1
    assert "not enough disk space" in capsys.readouterr().err


# --- sizes and messages --------------------------------------------------------------------------


@pytest.mark.parametrize("n, shown", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (int(5.2 * 2**20), "5.2 MiB"),
    (812 * 2**20, "812.0 MiB"), (5_051_320, "4.8 MiB"), (15 * 2**30, "15.0 GiB"),
    (16_060_522_496, "15.0 GiB"), (3 * 2**40, "3.0 TiB")])
def test_sizes_are_shown_in_the_unit_that_fits(n, shown):
    assert stage_weights.fmt_size(n) == shown


def test_not_enough_disk_space_for_a_small_model_says_how_much(hub_server, tmp_path, capsys,
                                                                 monkeypatch):
    m = manifest(hub_server, "main")
    need = sum(f["size"] for f in m["files"])
    monkeypatch.setattr(stage_weights.shutil, "disk_usage",
                        lambda p: type("Usage", (), {"free": 812 * 2**10})())
    assert stage_weights.stage(m, he.base_url(hub_server), he.GOOD_TOKEN, str(tmp_path)) == 1
    err = capsys.readouterr().err
    assert f"needs {stage_weights.fmt_size(need)} more, 812.0 KiB free" in err
    assert "0.0 GiB" not in err and "GiB" not in err


# --- the token file ------------------------------------------------------------------------------


@pytest.mark.parametrize("content, token", [
    ("HF_TOKEN='hf_abc'\n", "hf_abc"), ('HF_TOKEN="hf_abc"\n', "hf_abc"),
    ("HF_TOKEN=hf_abc\n", "hf_abc"), ("hf_abc\n", "hf_abc"), ("HUGGING_FACE_HUB_TOKEN=hf_b\n",
                                                              "hf_b"),
    ("VLLM_API_KEY='gf-key'\n", None), ("HF_TOKEN=''\n", None), ("", None)])
def test_the_token_file(tmp_path, content, token):
    path = tmp_path / "llama3.hf-token"
    path.write_text(content)
    assert stage_weights.read_token(str(path)) == token


def test_no_token_file_means_anonymous(tmp_path):
    assert stage_weights.read_token(str(tmp_path / "missing")) is None
    assert stage_weights.read_token(None) is None


# --- a full disk is not retried -----------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_a_full_disk_stops_at_once_with_the_space_message(hub_server, tmp_path, capsys,
                                                          monkeypatch, code):
    models = tmp_path / "models"
    models.mkdir()
    m = manifest(hub_server, "main")
    need = sum(f["size"] for f in m["files"])
    real_open = open

    class FullDisk(io.FileIO):
        def write(self, b):  # type: ignore[override]
            raise OSError(code, os.strerror(code))

    def fake_open(path, mode="r", *args, **kwargs):
        if "/partial/" in str(path) and ("w" in mode or "a" in mode):
            return FullDisk(path, mode.replace("b", ""))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(stage_weights, "open", fake_open, raising=False)
    slept: list[float] = []
    before = stats(hub_server)["requests_by_kind"].get("resolve_get", 0)
    assert stage_weights.stage(m, he.base_url(hub_server), he.GOOD_TOKEN, str(models),
                               sleep=slept.append) == 1
    err = capsys.readouterr().err
    assert stats(hub_server)["requests_by_kind"]["resolve_get"] - before == 1  # one attempt
    assert slept == [] and "resuming" not in err
    first = m["files"][0]["path"]
    assert f"not enough disk space in {models} (while writing {first})" in err
    assert f"needs {stage_weights.fmt_size(need)} more" in err and " free" in err


# --- one staging at a time -----------------------------------------------------------------------


def _throttle(server, bps: int) -> None:
    body = json.dumps({"throttle_bytes_per_second": bps}).encode()
    urllib.request.urlopen(urllib.request.Request(he.base_url(server) + "/_lab/faults",
                                                  data=body, method="POST")).close()


def _reset(server) -> None:
    urllib.request.urlopen(urllib.request.Request(he.base_url(server) + "/_lab/stats/reset",
                                                  method="POST")).close()


def _stager(server, tmp_path, m, *extra: str) -> subprocess.Popen:
    mpath = tmp_path / "manifest.json"
    mpath.write_text(json.dumps(m))
    token = tmp_path / "hf-token"
    token.write_text(f"HF_TOKEN='{he.GOOD_TOKEN}'\n")
    token.chmod(0o600)
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), "--manifest", str(mpath), "--endpoint",
         he.base_url(server), "--token-file", str(token), "--models-dir",
         str(tmp_path / "models"), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _partial_bytes(tmp_path) -> int:
    part = tmp_path / "models" / "hub" / f"models--{MODEL.replace('/', '--')}" / ".gpufleet" / \
        "partial"
    total = 0
    for file in part.glob("*") if part.is_dir() else ():
        try:
            total += file.stat().st_size
        except FileNotFoundError:  # finished and moved out between glob and stat
            pass
    return total


def _wait_for(what, predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


WEIGHTS = len(tinymodel.safetensors_bytes())  # model.safetensors of the tiny model
SLACK = 512 * 1024   # what was on the wire when a stager was killed


def test_a_second_stager_waits_then_resumes_what_the_first_left(hub_server, tmp_path):
    (tmp_path / "models").mkdir()
    m = manifest(hub_server, "main")
    size = sum(f["size"] for f in m["files"])
    _reset(hub_server)
    _throttle(hub_server, 1_000_000)  # about 5 s: time enough for the second to line up
    first = _stager(hub_server, tmp_path, m, "--no-watch-parent")
    _wait_for("the first stager's bytes", lambda: _partial_bytes(tmp_path) > 1_000_000)
    second = _stager(hub_server, tmp_path, m, "--no-watch-parent")
    line = second.stderr.readline()  # the first thing it says
    assert line.strip() == (f"waiting for another staging of {MODEL} (pid {first.pid}) to "
                            "finish"), line
    first.kill()  # the first one dies half-way: the second resumes from its partial file
    first.communicate()
    out, err = second.communicate(timeout=60)
    assert second.returncode == 0, err
    moved = stats(hub_server)["total_bytes"]
    assert size <= moved < size + SLACK, (moved, size)  # not twice: one download in all
    repo = tmp_path / "models" / "hub" / f"models--{MODEL.replace('/', '--')}"
    assert (repo / ".gpufleet" / "stage.lock").read_text().strip() == str(second.pid)
    assert Path(marker_path(str(tmp_path / "models"), MODEL, tinymodel.COMMIT_MAIN)).is_file()


def test_a_stager_that_waited_for_a_finished_one_downloads_nothing(hub_server, tmp_path):
    import fcntl

    models = tmp_path / "models"
    models.mkdir()
    m = manifest(hub_server, "main")
    _reset(hub_server)
    lock = Path(stage_weights.lock_path(str(models), MODEL))
    lock.parent.mkdir(parents=True)
    with open(lock, "w") as held:  # another staging (this test) holds the lock
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        stager = _stager(hub_server, tmp_path, m, "--no-watch-parent")
        assert stager.stderr.readline().strip() == (
            f"waiting for another staging of {MODEL} (pid 4242) to finish")
        marker = Path(marker_path(str(models), MODEL, m["commit"]))
        marker.write_text("{}")  # ... and finishes
    out, _ = stager.communicate(timeout=60)
    assert stager.returncode == 0 and "was staged meanwhile by another run" in out
    assert stats(hub_server)["total_bytes"] == 0


# --- the staging stops with the run that started it ---------------------------------------------


def test_the_stager_stops_when_the_run_is_gone_and_the_next_run_resumes(hub_server, tmp_path):
    (tmp_path / "models").mkdir()
    m = manifest(hub_server, "main")
    size = sum(f["size"] for f in m["files"])
    _reset(hub_server)
    _throttle(hub_server, 1_000_000)
    run = subprocess.Popen(["sleep", "120"])  # stands in for sshd's session process
    stager = _stager(hub_server, tmp_path, m, "--watch-pid", str(run.pid))
    _wait_for("bytes", lambda: _partial_bytes(tmp_path) > 500_000)
    run.kill()  # not reaped yet: a zombie counts as gone too
    t0 = time.monotonic()
    out, err = stager.communicate(timeout=10)
    assert time.monotonic() - t0 < 4
    run.wait()
    assert stager.returncode == stage_weights.EXIT_RUN_GONE
    assert f"(pid {run.pid}) is gone: stopping the staging" in err
    kept = _partial_bytes(tmp_path)
    assert 500_000 < kept < WEIGHTS  # what arrived is kept
    # the lock was released: the next run takes it at once and moves only the remainder
    urllib.request.urlopen(urllib.request.Request(he.base_url(hub_server) + "/_lab/faults",
                                                  method="DELETE")).close()
    assert stage_weights.stage(m, he.base_url(hub_server), he.GOOD_TOKEN,
                               str(tmp_path / "models")) == 0
    moved = stats(hub_server)["total_bytes"]
    assert size <= moved < size + SLACK, (moved, size)


def test_a_watched_pid_that_does_not_exist_stages_nothing(hub_server, tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    stager = _stager(hub_server, tmp_path, manifest(hub_server, "main"), "--watch-pid",
                     str(gone.pid))
    _, err = stager.communicate(timeout=30)
    assert stager.returncode == stage_weights.EXIT_RUN_GONE and "does not exist" in err


def test_the_nearest_sshd_ancestor_is_the_one_watched(monkeypatch):
    table = {100: ("python3", "S", 50, 9), 50: ("sh", "S", 45, 8), 45: ("sudo", "S", 40, 8),
             40: ("sshd", "S", 30, 7), 30: ("sshd", "S", 1, 5)}
    monkeypatch.setattr(stage_weights, "proc_stat", table.get)
    assert stage_weights.session_ancestor(100) == (40, 7)
    table[40] = ("sshd-session", "S", 30, 7)  # OpenSSH 9.8+
    assert stage_weights.session_ancestor(100) == (40, 7)
    table[40] = ("bash", "S", 30, 7)
    assert stage_weights.session_ancestor(100) == (30, 5)
    table[30] = ("systemd", "S", 1, 1)  # pyinfra @local: nothing to watch
    assert stage_weights.session_ancestor(100) is None


def test_a_process_is_alive_only_with_its_start_time_and_not_as_a_zombie(monkeypatch):
    table = {7: ("sshd", "S", 1, 1234)}
    monkeypatch.setattr(stage_weights, "proc_stat", table.get)
    assert stage_weights.alive(7, 1234) and not stage_weights.alive(7, 999)  # pid reused
    table[7] = ("sshd", "Z", 1, 1234)
    assert not stage_weights.alive(7, 1234) and not stage_weights.alive(8, None)


def test_the_real_proc_stat_of_this_process():
    comm, state, ppid, start = stage_weights.proc_stat(os.getpid())
    assert ppid == os.getppid() and start > 0 and state in "RS"


def test_a_closed_output_means_the_run_is_gone(monkeypatch):
    class Closed:
        def write(self, _):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    exits: list[int] = []

    def fake_exit(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(stage_weights.sys, "stderr", Closed())
    monkeypatch.setattr(stage_weights.os, "_exit", fake_exit)
    with pytest.raises(SystemExit):
        stage_weights.say("resuming")
    assert exits == [stage_weights.EXIT_RUN_GONE]
