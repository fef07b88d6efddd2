"""Releases: ids, records, and the host script that records, switches, restores and audits them
(hostscripts/release_records.py, run here for real on a temp dir as the commands run it)."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
from pyinfra.api import StringCommand
from pyinfra.context import ctx_host, ctx_state
from pyinfra_testing.util import FakeState, create_host

from gpufleet.facts import release_records as release_facts
from gpufleet.facts.release_records import (
    RecordedServices,
    ReleaseState,
    empty_state,
    parse_state,
)
from gpufleet.fleet.rollout import rollback_target
from gpufleet.model import names
from gpufleet.model import release as releases
from gpufleet.model.secrets import Secret
from gpufleet.model.spec import build_spec
from gpufleet.operations import release_records as release_ops

BASE = {"service": "llama3", "model": "meta-llama/Meta-Llama-3-8B-Instruct",
        "image": "vllm/vllm-openai:v0.11.0", "quantization": "fp8"}
SPEC = build_spec(BASE)
ENV = Secret("HF_TOKEN='hf_SECRETSECRET'\nVLLM_API_KEY='gf-SECRETKEY'\n")
SCRIPT = Path(release_facts.__file__).resolve().parents[1] / "hostscripts/release_records.py"
_spec = importlib.util.spec_from_file_location("release_records_script", SCRIPT)
hostscript = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hostscript)  # type: ignore[union-attr]
UNIT = "[Service]\nExecStart=/usr/bin/docker run 'quoted' \"$HOME\" %h\n"


def _release(spec=SPEC, unit=UNIT, env=ENV) -> releases.Release:
    return releases.release_for(spec, unit, releases.sha256_text(env.reveal()))


# -- ids and records ---------------------------------------------------------------------------


def test_release_id_is_a_short_stable_content_hash():
    a, b = _release(), _release()
    assert a.id == b.id and len(a.id) == releases.ID_LENGTH and releases.is_release_id(a.id)


@pytest.mark.parametrize("change", [
    {"unit": UNIT + "# x\n"},
    {"env": Secret("VLLM_API_KEY='other'\n")},
    {"spec": build_spec({**BASE, "image": "vllm/vllm-openai:v0.11.1"})},
    {"spec": build_spec({**BASE, "revision": "abc123"})},
    {"spec": build_spec({**BASE, "quantization": "fp16"})},
    {"spec": build_spec({**BASE, "model": "Qwen/Qwen2.5-7B-Instruct"})},
])
def test_every_input_changes_the_id(change):
    assert _release(**change).id != _release().id


def test_resolved_revision_and_sized_flags_count():
    r = releases.release_for(SPEC, UNIT, "0" * 64, revision="c0ffee" * 6, flags=["--x", "1"])
    assert r.revision == "c0ffee" * 6 and r.flags == ("--x", "1") and r.id != _release().id


def test_record_keeps_the_env_digest_never_the_secrets():
    record = _release().record(created="2026-01-01T00:00:00Z", by="alice@laptop")
    text = releases.dumps(record)
    assert "SECRET" not in text and "\n" not in text
    assert record["env_sha256"] == releases.sha256_text(ENV.reveal())
    assert record["deployed_by"] == "alice@laptop" and record["unit_name"] == SPEC.unit_name
    assert record["unit_sha256"] == releases.sha256_text(UNIT)
    assert record["quantization"] == "fp8" and record["port"] == 8000
    assert "--quantization" in record["flags"]


def test_lock_holder_round_trip_and_description():
    h = releases.LockHolder(id="ab12cd34", command="rollout", who="bob@ctl", pid=42,
                            started="2026-01-01T00:00:00Z", release="0123456789ab", hosts=4)
    back = releases.LockHolder.from_doc(json.loads(h.to_json()))
    assert back == h
    assert h.describe() == ("rollout ab12cd34 to release 0123456789ab by bob@ctl (pid 42), "
                            "started 2026-01-01T00:00:00Z")
    assert releases.LockHolder.from_doc({"nope": 1}) is None


# -- the fact ----------------------------------------------------------------------------------


def test_release_state_parses_pointers_records_lock_and_unit():
    rec = _release().record()
    out = [f"current=releases/{rec['id']}", "previous=releases/0123456789ab",
           f"release={releases.dumps(rec)}", "release=not json",
           'lock={"id":"x1","who":"a@b","pid":1,"started":"t","command":"rollout"}',
           "unit=" + "f" * 64]
    st = parse_state(out)
    assert st["current"] == rec["id"] and st["previous"] == "0123456789ab"
    assert list(st["releases"]) == [rec["id"]]
    assert st["locked"] and st["lock"]["who"] == "a@b" and st["unit_sha256"] == "f" * 64
    empty = parse_state(["current=", "previous="])
    assert empty["current"] is None and not empty["locked"] and empty["releases"] == {}


def test_release_state_command_is_one_shell_line():
    cmd = ReleaseState().command(service="llama3")
    assert isinstance(cmd, StringCommand)
    text = cmd.get_raw_value()
    assert "/var/lib/gpufleet/llama3" in text and "gpufleet-llama3.service" in text


# -- the operations, by their commands ----------------------------------------------------------


def _op(op, facts, *args, **kwargs):
    state = FakeState()
    host = create_host(state, name="gpu-1", facts=facts)
    with ctx_state.use(state), ctx_host.use(host):
        commands = list(op._inner(*args, **kwargs))
    return host, [c.get_raw_value() for c in commands]


def _facts(**state):
    full = {"current": None, "previous": None, "releases": {}, "locked": False, "lock": None,
            "unit_sha256": None, **state}
    return {"release_records.ReleaseState": {"service=llama3": full}}


def test_recorded_is_a_noop_reading_one_fact_when_current():
    r = _release()
    host, cmds = _op(release_ops.recorded, _facts(current=r.id), service="llama3",
                     release_id=r.id, record=r.record(), unit=UNIT)
    assert cmds == [] and host.noop_description == f"release {r.id} is current"


def test_recorded_writes_one_command_without_secrets():
    r = _release()
    _, cmds = _op(release_ops.recorded, _facts(current="0123456789ab"), service="llama3",
                  release_id=r.id, record=r.record(), unit=UNIT)
    assert len(cmds) == 1 and "SECRET" not in cmds[0]
    assert f"--id={r.id}" in cmds[0] and "--dir=/var/lib/gpufleet/llama3" in cmds[0]


def test_unit_restored_fails_the_host_for_an_unknown_release():
    _, cmds = _op(release_ops.unit_restored, _facts(), service="llama3",
                  release_id="0123456789ab")
    assert len(cmds) == 1 and "is not recorded here" in cmds[0] and "exit 1" in cmds[0]


def test_unit_restored_noop_when_the_unit_in_place_is_the_release():
    rec = _release().record()
    host, cmds = _op(release_ops.unit_restored,
                     _facts(releases={rec["id"]: rec}, unit_sha256=rec["unit_sha256"]),
                     service="llama3", release_id=rec["id"])
    assert cmds == [] and "unit in place" in host.noop_description


# -- the scripts, run for real on a temporary root ------------------------------------------------


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setattr(names, "STATE_ROOT", str(tmp_path / "var"))
    monkeypatch.setattr(names, "UNIT_DIR", str(tmp_path / "units"))
    (tmp_path / "units").mkdir()
    return tmp_path


def _sh(command: StringCommand | str) -> subprocess.CompletedProcess:
    text = command.get_raw_value() if isinstance(command, StringCommand) else command
    return subprocess.run(["sh", "-c", text], capture_output=True, text=True)


def _state(service: str = "llama3") -> dict:
    out = _sh(ReleaseState().command(service=service))
    assert out.returncode == 0, out.stderr
    return parse_state(out.stdout.splitlines())


def _record(unit: str) -> releases.Release:
    r = _release(unit=unit)
    Path(releases.unit_path("llama3")).write_text(unit)  # the deploy wrote it before the gate
    _, cmds = _op(release_ops.recorded, {"release_records.ReleaseState": {"service=llama3": _state()}},
                  service="llama3", release_id=r.id, record=r.record(), unit=unit)
    for c in cmds:
        assert _sh(c).returncode == 0
    return r


def test_record_switch_keep_previous_and_prune(root):
    first = _record("unit one\n")
    st = _state()
    assert st["current"] == first.id and st["previous"] is None
    saved = Path(releases.release_dir("llama3", first.id)) / "unit"
    assert saved.read_text() == "unit one\n"
    second = _record("unit two\n")
    st = _state()
    assert (st["current"], st["previous"]) == (second.id, first.id)
    # a re-run of the same release changes nothing (no command)
    _, cmds = _op(release_ops.recorded, {"release_records.ReleaseState": {"service=llama3": st}},
                  service="llama3", release_id=second.id, record=second.record(),
                  unit="unit two\n")
    assert cmds == []
    # switch back (a rollback): pointers swap
    _, cmds = _op(release_ops.activated, {"release_records.ReleaseState": {"service=llama3": st}},
                  service="llama3", release_id=first.id)
    assert _sh(cmds[0]).returncode == 0
    assert (_state()["current"], _state()["previous"]) == (first.id, second.id)
    # many more releases: only KEEP_RELEASES kept, current and previous among them
    ids = [_record(f"unit {i}\n").id for i in range(releases.KEEP_RELEASES + 3)]
    st = _state()
    assert len(st["releases"]) == releases.KEEP_RELEASES
    assert st["current"] == ids[-1] and st["previous"] == ids[-2]


def test_unit_restored_puts_the_recorded_unit_back(root):
    first = _record("unit one\n")
    _record("unit two\n")
    live = Path(releases.unit_path("llama3"))
    live.write_text("unit two\n")
    st = _state()
    assert st["unit_sha256"] == releases.sha256_text("unit two\n")
    assert rollback_target(st) == first.id  # the unit in place is current's: go to previous
    cmd = release_ops.unit_restored._inner  # run without chown (not root in every test env)
    state = FakeState()
    host = create_host(state, facts={"release_records.ReleaseState": {"service=llama3": st}})
    with ctx_state.use(state), ctx_host.use(host):
        (command,) = list(cmd(service="llama3", release_id=first.id))
    text = command.get_raw_value().replace(" --owner=root:root", "")
    assert _sh(text).returncode == 0
    assert live.read_text() == "unit one\n"


def test_rollback_target_prefers_current_when_a_deploy_did_not_finish():
    st = {"current": "aaaaaaaaaaaa", "previous": "bbbbbbbbbbbb", "unit_sha256": "new",
          "releases": {"aaaaaaaaaaaa": {"unit_sha256": "old"}}}
    assert rollback_target(st) == "aaaaaaaaaaaa"
    st["unit_sha256"] = "old"
    assert rollback_target(st) == "bbbbbbbbbbbb"
    assert rollback_target({"current": None, "previous": None, "releases": {}}) is None


def test_a_release_is_not_recorded_when_the_unit_in_place_is_not_the_one_started(root):
    r = _release(unit="unit one\n")
    Path(releases.unit_path("llama3")).write_text("unit written by another run\n")
    _, cmds = _op(release_ops.recorded, {"release_records.ReleaseState": {"service=llama3": _state()}},
                  service="llama3", release_id=r.id, record=r.record(), unit="unit one\n")
    out = _sh(cmds[0])
    assert out.returncode == 1 and "is not the unit this run wrote" in out.stderr
    assert _state()["current"] is None


# -- the host script itself (hostscripts/release_records.py), on a temporary root -----------------


def _script(*args: str) -> subprocess.CompletedProcess:
    """Run the host script as the commands do: ``python3 -c <script> ARGS``."""
    return subprocess.run(["python3", "-c", release_facts.script(), *args],
                          capture_output=True, text=True)


def test_the_script_is_stdlib_ascii_and_knows_the_layout_names_py_names():
    text = release_facts.script()
    assert text.isascii()  # argv and stdin decoding on a host in the C locale
    imported = {line.split()[1].split(".")[0] for line in text.splitlines()
                if line.startswith(("import ", "from "))}
    assert imported <= {"__future__", "argparse", "fcntl", "hashlib", "os", "shutil", "sys"}
    d = releases.service_dir("llama3")
    for const, path in ((hostscript.RELEASES, releases.releases_dir("llama3")),
                        (hostscript.LOCK, releases.lock_path("llama3")),
                        (hostscript.HOLDER, releases.lock_holder_path("llama3")),
                        (hostscript.AUDIT, releases.audit_log("llama3"))):
        assert f"{d}/{const}" == path
    assert f"{releases.releases_dir('llama3')}/x/{hostscript.RECORD}" == (
        f"{releases.release_dir('llama3', 'x')}/release.json")


def test_every_command_shows_the_script_masked():
    for cmd in (ReleaseState().command(service="llama3"), RecordedServices().command(),
                release_ops.audit_command("llama3", '{"a":1}')):
        shown, raw = str(cmd), cmd.get_raw_value()
        assert "<hostscripts/release_records.py>" in shown and "def main" not in shown
        assert "def main" in raw


def test_a_fresh_host_has_no_releases_and_no_services(root):
    assert _state() == empty_state()
    out = _sh(RecordedServices().command())
    assert out.returncode == 0 and RecordedServices().process(out.stdout.splitlines()) == []


def test_the_fact_reads_exactly_what_is_recorded(root):
    r = _record("unit one\n")
    d = Path(releases.service_dir("llama3"))
    # a run holds the lock (another open file: as another process would)
    holder = '{"command":"rollout","id":"x1","pid":1,"started":"t","who":"a@b"}'
    (d / "lock.holder.json").write_text(holder + "\n")
    with open(d / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        held = _state()
    assert held == {
        "current": r.id, "previous": None,
        "releases": {r.id: json.loads((d / "releases" / r.id / "release.json").read_text())},
        "locked": True, "lock": json.loads(holder),
        "unit_sha256": releases.sha256_text("unit one\n"),
    }
    assert _state()["locked"] is False  # a holder file without the flock means nothing
    out = _sh(RecordedServices().command())
    assert RecordedServices().process(out.stdout.splitlines()) == ["llama3"]


def test_record_writes_one_json_line_and_the_unit_byte_for_byte(root):
    unit = "-[Unit] starts with a dash\nDescription='q' \"qq\" $HOME `x` \\ é\n"
    r = _record(unit)
    rdir = Path(releases.release_dir("llama3", r.id))
    assert (rdir / "unit").read_bytes() == unit.encode()
    line = (rdir / "release.json").read_text()
    assert line.count("\n") == 1 and json.loads(line)["id"] == r.id
    assert sorted(p.name for p in rdir.iterdir()) == ["release.json", "unit"]
    # recorded again (e.g. current moved away meanwhile): the record is kept as it was
    before = (rdir / "release.json").read_bytes()
    out = _script("record", f"--dir={releases.service_dir('llama3')}",
                  f"--unit={releases.unit_path('llama3')}", f"--id={r.id}", "--keep=5",
                  '--record={"other":1}', "--unit-text=other", f"--unit-sha256={r.unit_sha256}")
    assert out.returncode == 0, out.stderr
    assert (rdir / "release.json").read_bytes() == before and (rdir / "unit").read_bytes() == (
        unit.encode())


def test_pruning_never_removes_previous_even_when_it_is_the_oldest(root):
    kept = [_record(f"unit {i}\n") for i in range(releases.KEEP_RELEASES + 2)][2:]
    assert sorted(_state()["releases"]) == sorted(r.id for r in kept)
    oldest = kept[0]
    # a rollback to the oldest record, then a new release: the oldest is previous now
    assert _sh(release_ops._activate_command("llama3", oldest.id)).returncode == 0
    newest = _record("unit new\n")
    st = _state()
    assert (st["current"], st["previous"]) == (newest.id, oldest.id)
    assert len(st["releases"]) == releases.KEEP_RELEASES + 1 and oldest.id in st["releases"]
    d = Path(releases.service_dir("llama3"))
    assert os.readlink(d / "current") == f"releases/{newest.id}"
    assert os.readlink(d / "previous") == f"releases/{oldest.id}"
    assert not list(d.glob("*.new")) and not list((d / "releases").glob(".*"))


def test_audit_appends_lines_creating_the_directory(root):
    for line in ('{"rollout":"r1"}', '{"rollout":"r2","x":"-dash"}'):
        out = _sh(release_ops.audit_command("llama3", line))
        assert out.returncode == 0, out.stderr
    assert Path(releases.audit_log("llama3")).read_text() == (
        '{"rollout":"r1"}\n{"rollout":"r2","x":"-dash"}\n')


def test_activating_where_nothing_is_recorded_fails_with_a_reason(root):
    out = _sh(release_ops._activate_command("llama3", "0123456789ab"))
    assert out.returncode == 1 and out.stderr.startswith("gpufleet: release_records activate")


def test_restore_unit_of_a_missing_copy_fails_and_leaves_the_unit(root):
    live = Path(releases.unit_path("llama3"))
    live.write_text("unit in place\n")
    out = _script("restore-unit", f"--dir={releases.service_dir('llama3')}", f"--unit={live}",
                  "--id=0123456789ab")
    assert out.returncode == 1 and "gpufleet:" in out.stderr
    assert live.read_text() == "unit in place\n" and sorted(os.listdir(live.parent)) == [
        live.name]
