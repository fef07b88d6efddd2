"""Rollout planning (pure) and the driver on pyinfra's @fake connector (no network)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from pyinfra.api import Inventory

from gpufleet.fleet import rollout
from gpufleet.fleet import run_lock as hostlock
from gpufleet.model import release as releases
from gpufleet.model.spec import build_spec

# -- planning ------------------------------------------------------------------------------------

NAMES = [f"gpu-{i:02d}" for i in range(1, 9)]


@pytest.mark.parametrize("text,fleet,size", [
    ("25%", 4, 1), ("25%", 8, 2), ("25%", 10, 3), ("50%", 5, 3), ("100%", 7, 7),
    ("1%", 3, 1), ("3", 100, 3),
])
def test_batch_size(text, fleet, size):
    assert rollout.batch_size(text, fleet) == size


@pytest.mark.parametrize("bad", ["0", "-1", "0%", "150%", "x", "2.5"])
def test_batch_size_refuses_nonsense(bad):
    with pytest.raises(rollout.RolloutError, match="--batch"):
        rollout.batch_size(bad, 4)


def test_default_plan_is_canary_then_quarter_batches_in_name_order():
    names = rollout.order_hosts(reversed(NAMES))
    plan = rollout.plan_batches(names)
    assert [b.label for b in plan] == ["canary", "batch 2", "batch 3", "batch 4", "batch 5"]
    assert plan[0].hosts == ("gpu-01",)
    assert [list(b.hosts) for b in plan[1:]] == [NAMES[1:3], NAMES[3:5], NAMES[5:7], NAMES[7:]]


def test_plan_with_batch_two_on_four_hosts():
    plan = rollout.plan_batches(NAMES[:4], canary=1, batch="2")
    assert [(b.label, b.hosts) for b in plan] == [
        ("canary", ("gpu-01",)), ("batch 2", ("gpu-02", "gpu-03")), ("batch 3", ("gpu-04",))]


def test_plan_without_canary_and_percentage_of_the_whole_fleet():
    # 2 hosts left to change out of a fleet of 8: 50% of the fleet is 4 per batch
    plan = rollout.plan_batches(["gpu-03", "gpu-07"], canary=0, batch="50%", fleet=8)
    assert [(b.label, b.hosts) for b in plan] == [("batch 1", ("gpu-03", "gpu-07"))]
    assert rollout.plan_batches([], canary=1) == []


def test_order_puts_named_hosts_first_and_refuses_unknown_ones():
    assert rollout.order_hosts(NAMES[:4], ["gpu-03", "gpu-01"]) == [
        "gpu-03", "gpu-01", "gpu-02", "gpu-04"]
    with pytest.raises(rollout.RolloutError, match="gpu-99"):
        rollout.order_hosts(NAMES, ["gpu-99"])
    with pytest.raises(rollout.RolloutError, match="twice"):
        rollout.order_hosts(NAMES, ["gpu-01", "gpu-01"])


@pytest.mark.parametrize("fleet,out", [(1, 1), (4, 1), (8, 2), (10, 3), (40, 10)])
def test_defaults_take_at_most_one_batch_out_of_service(fleet, out):
    assert rollout.max_out_of_service(fleet) == out


# -- the driver on @fake hosts -------------------------------------------------------------------

SPEC = {"service": "llama3", "model": "meta-llama/Meta-Llama-3-8B-Instruct",
        "image": "vllm/vllm-openai:v0.11.0"}
DEPLOY = """
from pyinfra import host
from pyinfra.operations import server
from gpufleet.operations import release_records as releases
from gpufleet.model.secrets import Secret
from gpufleet.model.spec import build_spec
from gpufleet.fleet.deploy_results import DeployResult, hand_back

spec = build_spec({spec!r}, overrides={{"quantization": host.data.get("quantization", "fp8")}})
server.shell(name="Restart the service", commands=["systemctl restart gpufleet-llama3"])
gate = server.shell(name="Endpoint answers on :8000", commands=["fake-health-gate"])
release = releases.release_recorded(spec=spec, unit="unit " + spec.quantization, env=Secret("x"))
hand_back(DeployResult(health_gate=gate, release=release))
"""
OLD_UNIT = "unit fp8"


def old_release() -> releases.Release:
    spec = build_spec({**SPEC, "quantization": "fp8"})
    return releases.release_for(spec, OLD_UNIT, releases.sha256_text("x"))


def state_lines(lock: dict | None = None) -> list[str]:
    rec = old_release().record(created="2026-01-01T00:00:00Z", by="t@t")
    lines = [f"current=releases/{rec['id']}", "previous=",
             f"release={releases.dumps(rec)}", "unit=" + rec["unit_sha256"]]
    if lock:
        lines.append("lock=" + json.dumps(lock))
    return lines


class Recorder(rollout.Events):
    def __init__(self) -> None:
        self.lines: list[tuple[str | None, str]] = []

    def emit(self, host, text):
        self.lines.append((host, text))

    def of(self, host: str) -> list[str]:
        return [t for h, t in self.lines if h == host]


class FakeLeases:
    """The run lock on @fake hosts (which cannot run the host script): leases that record
    their audit lines; ``held`` names hosts another run holds; ``lost`` hosts' leases died."""

    def __init__(self, held: dict | None = None, lost: tuple[str, ...] = ()) -> None:
        self.held, self.lost = held, lost
        self.audit: dict[str, list[str]] = {}
        self.released: list[str] = []

    def __call__(self, state, host, service, holder, wait=0.0):
        if self.held is not None:
            raise hostlock.LockError(f"{host.name}: held by {hostlock.describe(self.held)}",
                                     holder=self.held)
        leases = self

        class Pipe:
            def __init__(self) -> None:
                self.last = ""

            def write(self, text: str) -> None:
                self.last = text

            def flush(self) -> None:
                verb, _, rest = self.last.strip().partition(" ")
                if verb == "AUDIT" and host.name not in leases.lost:
                    leases.audit.setdefault(host.name, []).append(rest)
                    self.answer = "AUDITED\n"
                else:
                    self.answer = ""

            def readline(self) -> str:
                return getattr(self, "answer", "")

        pipe = Pipe()
        return hostlock.Lease(host.name, service, holder, pipe, pipe,
                              lambda: self.released.append(host.name))


def fleet(n: int = 4, bad: tuple[str, ...] = ()) -> Inventory:
    hosts = []
    for i in range(1, n + 1):
        name = f"gpu-{i:02d}"
        responses: dict = {" state --dir=": state_lines()}  # the ReleaseState fact
        if name in bad:
            responses["fake-health-gate"] = {
                "success": False,
                "stderr": ["/health did not answer 200 within 20s. Last log lines of x:",
                           "ERROR engine died"]}
        hosts.append((f"@fake/{name}", {"fake_delay": 0, "fake_delay_jitter": 0,
                                        "fake_responses": responses}))
    return Inventory((hosts, {}), override_data={"quantization": "fp16"})


@pytest.fixture
def deploy_file(tmp_path) -> Path:
    path = tmp_path / "deploy.py"
    path.write_text(textwrap.dedent(DEPLOY.format(spec=SPEC)))
    return path


def drive(deploy_file: Path, inventory: Inventory, leases: FakeLeases | None = None,
          **options) -> tuple[rollout.Report, Recorder]:
    events = Recorder()
    opts = rollout.Options(command="rollout", inventory="fake", deploy=str(deploy_file),
                           probe_interval=0.05, **options)
    report = rollout.Driver(opts, events, inventory=inventory,
                            acquire=leases or FakeLeases()).run()
    return report, events


def test_rollout_goes_canary_then_batches_and_every_host_ends_healthy(deploy_file):
    report, events = drive(deploy_file, fleet(), batch="2")
    assert report.exit_code == rollout.OK and report.result == "completed", report.message
    assert [(b["label"], b["hosts"]) for b in report.batches] == [
        ("canary", ["@fake/gpu-01"]), ("batch 2", ["@fake/gpu-02", "@fake/gpu-03"]),
        ("batch 3", ["@fake/gpu-04"])]
    old = old_release().id
    for h in report.hosts:
        assert h.result == rollout.HEALTHY and h.from_release == old
        assert h.to_release not in (None, old) and h.now_on == h.to_release
    # batch boundaries in the live lines, in order
    marks = [t for h, t in events.lines if h is None and t.startswith("== ")]
    assert marks == ["== canary (1/3): @fake/gpu-01",
                     "== batch 2 (2/3): @fake/gpu-02, @fake/gpu-03",
                     "== batch 3 (3/3): @fake/gpu-04"]
    assert events.of("@fake/gpu-02")[-3:] == [
        "deploying", "waiting for health", f"healthy on {report.hosts[0].to_release} "
        f"({report.host('@fake/gpu-02').seconds:.1f}s)"]


def test_failed_canary_is_rolled_back_and_stops_the_rollout(deploy_file):
    report, events = drive(deploy_file, fleet(bad=("gpu-01",)))
    assert report.exit_code == rollout.ABORTED and report.result == "aborted"
    canary = report.host("@fake/gpu-01")
    assert canary.result == rollout.ROLLED_BACK and canary.now_on == old_release().id
    assert "/health did not answer 200 within 20s" in canary.detail
    assert "ERROR engine died" in canary.detail
    assert any(t.startswith("rolled back to ") for t in events.of("@fake/gpu-01"))
    for name in ("@fake/gpu-02", "@fake/gpu-03", "@fake/gpu-04"):
        assert report.host(name).result == rollout.NOT_REACHED
        assert events.of(name) == ["connecting", "connected"]  # preflight only


def test_failures_within_max_failed_go_on(deploy_file):
    report, _ = drive(deploy_file, fleet(bad=("gpu-03",)), batch="2", max_failed=1)
    assert report.exit_code == rollout.FAILED_WITHIN_LIMIT
    assert report.host("@fake/gpu-03").result == rollout.ROLLED_BACK
    assert report.host("@fake/gpu-04").result == rollout.HEALTHY


def test_held_lock_refuses_before_anything_changes(deploy_file):
    holder = {"id": "beef0001", "command": "deploy", "who": "alice@laptop", "pid": 7,
              "started": "2026-01-01T00:00:00Z"}
    report, events = drive(deploy_file, fleet(), leases=FakeLeases(held=holder))
    assert report.exit_code == rollout.LOCKED
    assert "deploy beef0001 by alice@laptop" in report.message
    assert "--wait" in report.message and "--break-lock" in report.message
    assert not any(t.startswith("== ") for _, t in events.lines)


def test_every_host_gets_an_audit_line_under_the_lock_and_the_lock_is_released(deploy_file):
    leases = FakeLeases()
    report, _ = drive(deploy_file, fleet(), leases=leases)
    assert report.exit_code == rollout.OK
    assert sorted(leases.audit) == [f"@fake/gpu-0{i}" for i in range(1, 5)]
    line = json.loads(leases.audit["@fake/gpu-02"][0])
    assert line["rollout"] == report.id and line["host_result"] == rollout.HEALTHY
    assert sorted(leases.released) == sorted(leases.audit)


def test_hosts_already_on_the_release_are_left_alone(deploy_file):
    inv = fleet()
    inv = Inventory(([(h.name, h.data.dict()) for h in inv], {}),
                    override_data={"quantization": "fp8"})
    report, events = drive(deploy_file, inv)
    assert report.exit_code == rollout.OK and report.batches == []
    assert {h.result for h in report.hosts} == {rollout.UNCHANGED}


def test_a_deploy_that_records_no_release_is_refused(tmp_path):
    path = tmp_path / "plain.py"
    path.write_text("from pyinfra.operations import server\n"
                    "server.shell(name='x', commands=['true'])\n")
    report, _ = drive(path, fleet())
    assert report.exit_code == rollout.USAGE and "records no release" in report.message


def lost_fleet_driver() -> tuple[rollout.Driver, Recorder]:
    hosts = [(h.name, {**h.data.dict(), "fake_delay": 0.05}) for h in fleet()]
    inv = Inventory((hosts, {}), override_data={"quantization": "fp16"})
    events = Recorder()
    opts = rollout.Options(command="rollout", inventory="fake", deploy=None, batch="2",
                           probe_interval=0.01, probe_misses=2)
    # gpu-03 stops answering its SSH port (the watchdog's probe) during its batch
    driver = rollout.Driver(opts, events, inventory=inv,
                            probe=lambda host: host.name != "@fake/gpu-03")
    return driver, events


def test_lost_host_counts_as_failed_and_gets_no_audit_line(deploy_file):
    driver, events = lost_fleet_driver()
    driver.opts.deploy = str(deploy_file)
    driver.acquire = FakeLeases(lost=("@fake/gpu-03",))
    report = driver.run()
    gpu3 = report.host("@fake/gpu-03")
    assert report.exit_code == rollout.ABORTED
    assert gpu3.result == rollout.ROLLBACK_FAILED and "host lost" in gpu3.detail
    assert "does not answer" in gpu3.detail
    assert any(t.startswith("host lost") for t in events.of("@fake/gpu-03"))
    assert report.host("@fake/gpu-02").result == rollout.HEALTHY
    assert report.host("@fake/gpu-04").result == rollout.NOT_REACHED
    assert report.audit_missing == ["@fake/gpu-03"]


def test_plan_only_changes_nothing_and_data_other_than_spec_keys_is_masked(deploy_file):
    inv = fleet()
    report, events = drive(deploy_file, inv, plan_only=True,
                           data={"quantization": "fp16", "ssh_password": "hunter2"})
    assert report.exit_code == rollout.OK and report.result == "planned"
    assert [b["label"] for b in report.batches] == ["canary", "batch 2", "batch 3", "batch 4"]
    assert not any(t.startswith("lock taken") for _, t in events.lines)
    assert report.options["data"] == {"quantization": "fp16", "ssh_password": "(set)"}
    assert "hunter2" not in json.dumps(report.as_dict())


def test_cli_parses_the_rollout_options_and_prints_the_table():
    import io

    from gpufleet.cli import fleet as rollout_cli
    from gpufleet.cli.main import build_parser

    args = build_parser().parse_args([
        "rollout", "inventories/do.py", "deploys/llama3.py", "--canary", "2", "--batch", "50%",
        "--pause", "30", "--max-failed", "1", "--order", "b,a", "--data", "quantization=fp16",
        "--yes", "--json", "--skip-unreachable", "--break-lock"])
    assert (args.canary, args.batch, args.pause, args.max_failed, args.order, args.data) == (
        2, "50%", 30.0, 1, ["b", "a"], ["quantization=fp16"])
    assert args.yes and args.json and args.skip_unreachable and args.break_lock
    back = build_parser().parse_args(["rollback", "inv.py", "--to", "0123456789ab", "--limit",
                                      "h1", "--limit", "h2"])
    assert back.to_release == "0123456789ab" and back.limit == ["h1", "h2"]

    report = rollout.Report(id="ab12cd34", command="rollout", by="a@b", started="t",
                            inventory="inv.py", result="aborted", exit_code=rollout.ABORTED,
                            message="canary: 1 host(s) failed")
    report.hosts = [
        rollout.HostResult("gpu-01", "canary", "aaaaaaaaaaaa", "bbbbbbbbbbbb",
                           rollout.ROLLED_BACK, "/health did not answer", 23.04),
        rollout.HostResult("gpu-02", "batch 2", "aaaaaaaaaaaa", "bbbbbbbbbbbb")]
    report.timings["total_s"] = 28.0
    out = io.StringIO()
    rollout_cli.print_report(report, out)
    text = out.getvalue()
    assert "gpu-01  canary   aaaaaaaaaaaa  bbbbbbbbbbbb  failed, rolled back  23.0s" in text
    assert "gpu-02  batch 2  aaaaaaaaaaaa  bbbbbbbbbbbb  not reached" in text
    assert "rollout ab12cd34 aborted in 28.0s (exit 3): canary: 1 host(s) failed" in text


def test_a_lost_hosts_dying_greenlet_does_not_fail_its_batch_mates(deploy_file, monkeypatch):
    """Cutting a lost host's connection can end pyinfra's whole run with that host's exception
    (EOFError from paramiko): the batch mates are deployed again, not failed with it."""
    import gevent

    from gpufleet.fleet import batch_run

    real_run_ops = batch_run.run_ops
    calls = []

    def run_ops(state, *args, **kwargs):
        names = sorted(h.name for h in state.inventory)
        calls.append(names)
        if "@fake/gpu-03" in names and len([c for c in calls if "@fake/gpu-03" in c]) == 1:
            gevent.sleep(0.2)  # the watchdog marks gpu-03 lost meanwhile
            raise EOFError()
        return real_run_ops(state, *args, **kwargs)

    monkeypatch.setattr(batch_run, "run_ops", run_ops)
    driver, events = lost_fleet_driver()
    driver.opts.deploy = str(deploy_file)
    report = driver.run()
    assert report.host("@fake/gpu-02").result == rollout.HEALTHY
    assert report.host("@fake/gpu-03").result == rollout.ROLLBACK_FAILED
    assert ["@fake/gpu-02"] in calls  # deployed again on its own


def test_the_gpufleet_command_patches_gevent_before_pyinfra_is_imported():
    """The hosts of a batch run at once only on gevent-patched sockets: ``gpufleet`` patches
    when its module is imported (as pyinfra's CLI does), in its own process: no re-exec."""
    import subprocess
    import sys

    code = textwrap.dedent("""
        import sys, warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import gpufleet.cli.main
        late = [str(w.message) for w in caught if "Monkey-patching" in str(w.message)]
        assert not late, late
        from gevent import monkey
        assert all(monkey.is_module_patched(m) for m in ("socket", "ssl", "threading"))
        import gpufleet.cli.fleet as cli
        assert not hasattr(cli, "_BOOT") and not hasattr(cli, "_respawn")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
