"""Fleet rollouts and rollbacks on pyinfra's Python API: canary, batches, health gates, abort.

pyinfra has no batches with health gates (``--serial`` takes hosts in random order and a failed
batch does not stop the next), so the driver owns them:

1. **Preflight** (nothing changes): connect to every host, define the deploy on each (the
   deploy hands back the release each host will get, see ``gpufleet.fleet.deploy_results``),
   read the releases recorded on the hosts and any lock. Unreachable hosts stop here.
2. **Lock** every host: the service's run lock (``gpufleet.fleet.run_lock``), the one every plain
   deploy takes too, held as a lease for the whole run; a held lock refuses the rollout.
3. **Batches**, in a deterministic order (``gpufleet.fleet.batches``): the canary hosts, then
   batches of N hosts or P% of the fleet. One pyinfra ``State`` per batch runs the deploy
   (``gpufleet.fleet.batch_run``); a host is done only when the whole deploy, health gate
   included, passed, which is also the only way its release becomes ``current``. A watchdog
   cuts off a host that stops answering (a lost host counts as failed instead of hanging the
   batch).
4. **Failed hosts** are restored to the release they had (its recorded unit, daemon-reload,
   restart, health gate again; image and weights are still on the host: nothing downloads).
   More failed hosts in a batch than ``max_failed`` aborts: later batches are not touched.
5. **Finish** (always, also on errors and Ctrl-C): an audit line on every host, the lock
   released.

The pyinfra plumbing needs gevent's monkey-patching, done by the ``gpufleet`` command when it is
imported, before pyinfra is.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from pyinfra import host as ctx_host_obj
from pyinfra.api import BaseStateCallback, Inventory, State, deploy
from pyinfra.api.deploy import add_deploy
from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.host import Host
from pyinfra.context import ctx_inventory
from pyinfra.operations import systemd

from gpufleet.facts.release_records import ReleaseState, empty_state
from gpufleet.fleet import run_lock
from gpufleet.fleet import session as fleet_session
from gpufleet.fleet.batch_run import BatchRunner, Outcome, Watch
from gpufleet.fleet.batches import (
    DEFAULT_BATCH,
    Batch,
    batch_size,
    max_out_of_service,
    order_hosts,
    plan_batches,
)
from gpufleet.fleet.deploy_results import DeployResult, hand_back, results_of
from gpufleet.fleet.fleet_lock import FleetLock
from gpufleet.fleet.lb_gate import (
    DEFAULT_DRAIN,
    GateError,
    LoadBalancerGate,
    gate_for,
    out_of_service,
)
from gpufleet.fleet.progress import Progress
from gpufleet.fleet.recorded import discover_service, read_states
from gpufleet.fleet.releases_listing import list_releases
from gpufleet.fleet.report import (
    ABORTED,
    FAILED,
    FAILED_WITHIN_LIMIT,
    HEALTHY,
    LOCKED,
    NOT_REACHED,
    NOT_ROLLED_BACK,
    OK,
    ROLLBACK_FAILED,
    ROLLED_BACK,
    SKIPPED,
    UNCHANGED,
    UNREACHABLE,
    USAGE,
    Events,
    HostResult,
    Report,
    RolloutError,
    Silent,
)
from gpufleet.fleet.session import load_inventory
from gpufleet.fleet.watchdog import PROBE_INTERVAL, PROBE_MISSES, host_answers
from gpufleet.model import names
from gpufleet.model import release as releases
from gpufleet.model.spec import SPEC_KEYS
from gpufleet.operations import release_records as release_ops
from gpufleet.operations import vllm


@dataclass
class Options:
    command: str  # "rollout" or "rollback"
    inventory: str
    deploy: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    canary: int = 1
    batch: str = DEFAULT_BATCH
    pause: float = 0.0
    max_failed: int = 0
    skip_unreachable: bool = False
    order: list[str] | None = None
    limit: list[str] | None = None
    break_lock: bool = False
    wait: float = 0.0  # seconds to wait for a lock another run holds
    to_release: str | None = None
    service: str | None = None
    confirm: Callable[[Report], bool] | None = None  # None: go ahead (--yes)
    plan_only: bool = False  # preflight and plan, change nothing (--json without --yes)
    # deploy hosts already on the target release too (after a rebuild or a golden snapshot the
    # records say "current" while the server is stopped and its secrets are gone)
    redeploy: bool = False
    connect_timeout: int = 10
    probe_interval: float = PROBE_INTERVAL
    probe_misses: int = PROBE_MISSES
    drain: float = DEFAULT_DRAIN  # seconds out of the load balancer before a restart

    def as_report_options(self) -> dict[str, Any]:
        """The options as the report and the audit log keep them (``--data`` values other
        than spec keys masked: they may be secrets)."""
        return {"canary": self.canary if self.command == "rollout" else 0,
                "batch": self.batch, "pause": self.pause, "max_failed": self.max_failed,
                "order": self.order, "limit": self.limit, "to": self.to_release,
                "skip_unreachable": self.skip_unreachable,
                "data": {k: str(v) if k in SPEC_KEYS else "(set)" for k, v in self.data.items()}}


SERVING = (HEALTHY, ROLLED_BACK, UNCHANGED)  # results that put a host back in the load balancer

# -- deploys the driver runs ----------------------------------------------------------------


_CODE: dict[str, Any] = {}


def run_deploy_file(path: str) -> None:
    """Execute a deploy file (e.g. ``deploys/llama3.py``) for the current host, as pyinfra's
    CLI would: the driver runs the user's deploy, not a copy of its logic."""
    if path not in _CODE:
        with open(path, encoding="utf-8") as f:
            _CODE[path] = compile(f.read(), path, "exec")
    exec(_CODE[path], {"__file__": path, "__name__": "__gpufleet_deploy__"})


@deploy("Restore release")
def restore_release(service: str, targets: Mapping[str, str]) -> DeployResult:
    """Put a recorded release back on the host: its unit, daemon-reload and restart when the
    unit changed, the health gate, then make it ``current``. The env file (the current secrets)
    is left as it is; the image and the weights are on the host, so nothing downloads."""
    release_id = targets[ctx_host_obj.name]
    record = ctx_host_obj.get_fact(ReleaseState, service=service)["releases"].get(release_id, {})
    unit_name = record.get("unit_name") or releases.unit_name(service)
    unit = release_ops.unit_restored(name=f"Unit of release {release_id} in place",
                                     service=service, release_id=release_id)
    systemd.daemon_reload(name="systemd daemon-reload", _if=unit.did_change)
    systemd.service(name=f"Restart {unit_name} on release {release_id}", service=unit_name,
                    running=True, restarted=True, _if=unit.did_change)
    systemd.service(name=f"{unit_name} enabled and running", service=unit_name, running=True,
                    enabled=True)
    url = releases.endpoint_of(record)
    served = str(record.get("served_name", ""))
    gate = vllm.endpoint_verified(
        name=f"Endpoint answers as {served!r}", url=url, served_name=served,
        url_file=names.front_url_file(service),
        env_file=record.get("env_file", names.env_file(service)),
        container=record.get("container", names.container_name(service)), unit=unit_name,
        timeout=int(record.get("cold_start_timeout", 1200)),
    )
    release_ops.activated(name=f"Release {release_id} current", service=service,
                          release_id=release_id)
    return hand_back(DeployResult(health_gate=gate))


def rollback_target(state: Mapping[str, Any]) -> str | None:
    """Where ``gpufleet rollback`` takes a host by default: back to ``current`` when the unit in
    place is not current's (a deploy that never passed its health gate), else to ``previous``."""
    current = state.get("current")
    record = state.get("releases", {}).get(current or "", {})
    if current and state.get("unit_sha256") != record.get("unit_sha256"):
        return current
    return state.get("previous")


def rollback_targets(report: Report, states: Mapping[str, Mapping[str, Any]],
                     to_release: str | None = None) -> dict[str, str | None]:
    """Host name -> the release a rollback takes it to (``to_release``, else
    :func:`rollback_target`); a host without that release recorded is marked skipped."""
    targets: dict[str, str | None] = {}
    for name, st in states.items():
        target = targets[name] = to_release or rollback_target(st)
        hr = report.host(name)
        if target is None:
            hr.result, hr.detail = SKIPPED, "no previous release recorded"
        elif target not in st["releases"]:
            hr.result, hr.detail = SKIPPED, f"release {target} is not recorded here"
    return targets


def define_rollout(state: State, hosts: list[Host],
                   deploy_file: str) -> dict[str, releases.Release]:
    """Define ``deploy_file`` on the hosts of ``state`` without taking the run lock (nothing
    runs): host name -> the release its deploy handed back."""
    path = os.path.abspath(deploy_file)
    if not os.path.isfile(path):
        raise RolloutError(f"deploy file {deploy_file} does not exist")
    with ctx_inventory.use(state.inventory), run_lock.deferred():
        try:
            add_deploy(state, run_deploy_file, path, host=hosts)
        except PyinfraError as e:
            raise RolloutError(f"{deploy_file}: {e}") from None
    handed_back = results_of(state)
    planned = {h.name: r.release for h in hosts
               if (r := handed_back.get(h.name)) is not None and r.release is not None}
    missing = [h.name for h in hosts if h.name not in planned]
    if missing:
        raise RolloutError(
            f"{deploy_file} records no release on {', '.join(missing)}: a rollout needs a "
            "deploy built on gpufleet.deploy.service.vllm_service")
    return planned


# -- the driver -------------------------------------------------------------------------------


class Driver:
    """One rollout or rollback over an inventory. ``run()`` never raises for host failures;
    it returns the Report (``exit_code`` included).

    ``probe(host)``: whether a host answers (default: its SSH port); ``acquire``: takes one
    host's run lock (default ``run_lock.acquire``; tests give leases of their own);
    ``callbacks``: pyinfra state callbacks added to every batch's state (e.g. a phase timer)."""

    def __init__(self, options: Options, events: Events | None = None,
                 inventory: Inventory | None = None,
                 probe: Callable[[Host], bool] | None = None,
                 acquire: Callable[..., run_lock.Lease | None] | None = None,
                 callbacks: Sequence[BaseStateCallback] = ()) -> None:
        self.opts = options
        self.callbacks = tuple(callbacks)
        self.events: Events = events or Silent()
        self.inventory = inventory
        self.probe = probe or host_answers
        self.acquire = acquire or run_lock.acquire
        self.lock = FleetLock()
        self._session: fleet_session.FleetSession | None = None
        self.went_ahead = False
        self.service: str | None = None
        self.states: dict[str, dict[str, Any]] = {}
        self.targets: dict[str, str | None] = {}
        self.gate: LoadBalancerGate | None = None
        self._planned: dict[str, releases.Release] = {}
        self.report = Report(
            id=uuid.uuid4().hex[:8], command=options.command, by=releases.deployed_by(),
            started=releases.now_iso(), inventory=options.inventory, deploy=options.deploy,
            options=options.as_report_options())

    def _time(self, key: str, since: float) -> None:
        self.report.add_time(key, time.monotonic() - since)

    @property
    def session(self) -> fleet_session.FleetSession:
        """The run's session, over the inventory given or loaded on first use."""
        if self._session is None:
            if self.inventory is None:
                self.inventory = load_inventory(self.opts.inventory, self.opts.data)
            self._session = fleet_session.FleetSession(self.inventory, self.opts.connect_timeout)
        return self._session

    def _batch_runner(self) -> BatchRunner:
        watch = Watch(self.probe, self.opts.probe_interval, self.opts.probe_misses)
        return BatchRunner(self.session, self.events, watch, self.report.add_time,
                           self.callbacks)

    # -- the phases --

    def run(self) -> Report:
        started = time.monotonic()
        try:
            self._run()
        except RolloutError as e:
            self.report.result, self.report.exit_code, self.report.message = "error", USAGE, str(e)
        finally:  # also on KeyboardInterrupt: the audit lines, and the locks released
            self._finish()
            self.report.finished = releases.now_iso()
            self._time("total_s", started)
        return self.report

    def _run(self) -> None:
        opts, report = self.opts, self.report
        ordered = order_hosts(self._selected_hosts(), opts.order)
        report.hosts = [HostResult(host=n) for n in ordered]
        if opts.max_failed < 0:
            raise RolloutError(f"--max-failed must be 0 or more, got {opts.max_failed}")
        t = time.monotonic()
        reachable = self._preflight(ordered)
        self._time("preflight_s", t)
        if reachable is None:
            return
        work = [n for n in reachable if self._needs_change(n)]
        canary = opts.canary if opts.command == "rollout" else 0
        batches = plan_batches(work, canary, opts.batch, fleet=len(ordered))
        report.batches = [{"label": b.label, "hosts": list(b.hosts)} for b in batches]
        for b in batches:
            for n in b.hosts:
                report.host(n).batch = b.label
        if not batches:
            report.result, report.exit_code = "completed", OK
            report.message = "nothing to do: every host is on its release already"
        elif opts.plan_only:
            report.result, report.exit_code = "planned", OK
            report.message = "plan only (--yes to go ahead): nothing changed"
        elif opts.confirm is not None and not opts.confirm(report):
            report.result, report.exit_code, report.message = "not confirmed", USAGE, ""
        else:
            self.went_ahead = True
            try:
                self.gate = gate_for({n: self.session.host(n).data.dict() for n in ordered},
                                     opts.drain, emit=self.events.emit, add_time=report.add_time)
            except GateError as e:
                raise RolloutError(str(e)) from None
            self._batches(batches)

    def _selected_hosts(self) -> list[str]:
        hosts = self.session.names()
        limit = self.opts.limit
        if not limit:
            return hosts
        missing = [n for n in limit if n not in hosts]
        if missing:
            raise RolloutError(f"--limit names hosts that are not in the inventory: "
                               f"{', '.join(missing)}")
        return [n for n in hosts if n in limit]

    def _preflight(self, ordered: list[str]) -> list[str] | None:
        """Connect, define, read the hosts' releases and locks. Returns the hosts to work on,
        or None when the rollout must stop here (the report says why)."""
        opts, report = self.opts, self.report
        self.events.emit(None, f"preflight: connecting to {len(ordered)} hosts")
        progress = Progress(self.events, "connected")
        state = self.session.state(ordered, progress)
        try:
            connected = fleet_session.connect(state)
            down = [n for n in ordered if n not in {h.name for h in connected}]
            for n in down:
                why = progress.connect_errors.get(n, "?")
                report.host(n).result, report.host(n).detail = SKIPPED, "unreachable: " + why
                self.events.emit(n, f"unreachable: {why}")
            if down and not opts.skip_unreachable:
                report.result, report.exit_code = "refused: unreachable hosts", UNREACHABLE
                report.message = (f"{len(down)} host(s) unreachable: {', '.join(down)}; nothing "
                                  "changed (--skip-unreachable goes on without them)")
                return None
            up = [n for n in ordered if n not in down]
            if not up:
                raise RolloutError("no host is reachable")
            hosts = [state.inventory.get_host(n) for n in up]
            self.service = (self._define_rollout(state, hosts) if opts.command == "rollout"
                            else discover_service(state, hosts, opts.service))
            report.service = self.service
            if not opts.plan_only and not self._lock(state, hosts):  # a plan takes no lock
                return None
            self.states = read_states(state, hosts, self.service)
            self.targets = self._choose_targets(hosts)
            for n in up:
                report.host(n).from_release = self.states[n]["current"]
                report.host(n).to_release = self.targets.get(n)
            return up
        finally:
            if not self.lock.holds(state):  # else its connections hold the leases until the end
                fleet_session.shutdown(state)

    def _define_rollout(self, state: State, hosts: list[Host]) -> str:
        """Define the deploy on every host (nothing runs) to learn the release each host will
        get and the service."""
        self._planned = define_rollout(state, hosts, self.opts.deploy or "")
        services = {r.service for r in self._planned.values()}
        if len(services) != 1:
            raise RolloutError(f"the hosts run different services ({', '.join(services)}): "
                               "roll them out separately (--limit)")
        return services.pop()

    def _choose_targets(self, hosts: list[Host]) -> dict[str, str | None]:
        if self.opts.command == "rollout":
            return {h.name: self._planned[h.name].id for h in hosts}
        return rollback_targets(self.report, self.states, self.opts.to_release)

    def _needs_change(self, name: str) -> bool:
        hr, st = self.report.host(name), self.states[name]
        if hr.result == SKIPPED:
            return False
        target = self.targets.get(name)
        record = st["releases"].get(st["current"] or "", {})
        if (not self.opts.redeploy and target == st["current"]
                and st["unit_sha256"] == record.get("unit_sha256")):
            hr.result, hr.detail, hr.now_on = UNCHANGED, "already on this release", target
            return False
        return True

    def _lock(self, state: State, hosts: list[Host]) -> bool:
        """Take the service's run lock on every host (a lease held by this run's connections:
        released when the run ends, however it ends). A held lock refuses the whole run."""
        t = time.monotonic()
        report = self.report
        holder = releases.LockHolder(
            id=report.id, command=self.opts.command, who=report.by, pid=os.getpid(),
            started=report.started, hosts=len(hosts),
            release=",".join(sorted({r.id for r in self._planned.values()})) or None)
        self.lock.acquire = self.acquire  # read now: a caller may replace it after __init__
        refusal = self.lock.take(state, hosts, self.service or "", holder, self.opts.wait,
                                 self.opts.break_lock, emit=self.events.emit)
        self._time("lock_s", t)
        if refusal is not None:
            report.result, report.exit_code, report.message = (
                refusal.result, refusal.exit_code, refusal.message)
            report.lock = refusal.holder
            return False
        self.events.emit(None, f"lock taken on {len(hosts)} hosts "
                               f"({self.opts.command} {report.id} by {report.by})")
        return True

    def _batches(self, batches: list[Batch]) -> None:
        opts = self.opts
        for i, batch in enumerate(batches):
            if i and opts.pause:
                self.events.emit(None, f"pause {opts.pause:g}s")
                t = time.monotonic()
                time.sleep(opts.pause)
                self._time("pause_s", t)
            self.events.emit(None, f"== {batch.label} ({i + 1}/{len(batches)}): "
                                   f"{', '.join(batch.hosts)}")
            data = {n: self.session.host(n).data.dict() for n in batch.hosts}
            try:
                with out_of_service(self.gate, data, partial(self._serving, batch.hosts)):
                    outcomes = self._apply(list(batch.hosts))
                    failed = [n for n, o in outcomes.items() if not o.ok]
                    for n, o in outcomes.items():
                        self._note_outcome(n, o)
                    if failed:
                        self._restore(failed)
            except GateError as e:
                raise RolloutError(f"{e}; nothing restarted") from None
            if len(failed) > opts.max_failed:
                rest = [n for b in batches[i + 1:] for n in b.hosts]
                self.report.stopped(batch.label, failed, opts.max_failed, rest)
                return
        self.report.completed()

    def _serving(self, names: Sequence[str]) -> list[str]:
        return [n for n in names if self.report.host(n).result in SERVING]

    def _note_outcome(self, name: str, outcome: Outcome) -> None:
        hr = self.report.host(name)
        hr.seconds = round(outcome.seconds, 1)
        if outcome.release is not None:
            hr.to_release = outcome.release.id
        if outcome.ok:
            hr.result, hr.now_on = HEALTHY, hr.to_release
            self.events.emit(name, f"healthy on {hr.to_release} ({outcome.seconds:.1f}s)")
        else:
            hr.result, hr.detail = FAILED, outcome.reason
            self.events.emit(name, f"failed: {outcome.reason}")

    def _apply(self, hosts: list[str]) -> dict[str, Outcome]:
        """Run the rollout's deploy (or the rollback's restore) on one batch."""
        runner = self._batch_runner()
        if self.opts.command == "rollout":
            path = os.path.abspath(self.opts.deploy or "")
            return runner.run(hosts, "deploying", run_deploy_file, path, stage="deploy")
        targets = {n: t for n, t in self.targets.items() if t}
        return runner.run(hosts, "restoring", restore_release, self.service, targets,
                          stage="deploy")

    def _restore(self, failed: list[str]) -> None:
        """Put failed hosts back on the release they had before this rollout."""
        back: dict[str, str] = {}
        for n in failed:
            hr, before = self.report.host(n), self.states[n]["current"]
            if before is None or before not in self.states[n]["releases"]:
                hr.result = NOT_ROLLED_BACK
                self.events.emit(n, "no previous release recorded: left as it is")
            elif not self.probe(self.session.host(n)):
                hr.result = ROLLBACK_FAILED
                hr.detail += "; rollback impossible: the host does not answer"
                self.events.emit(n, "rollback failed: the host does not answer")
            else:
                back[n] = before
        if not back:
            return
        t = time.monotonic()
        outcomes = self._batch_runner().run(sorted(back), "rolling back", restore_release,
                                            self.service, back, stage="rollback")
        self._time("rollback_s", t)
        for n, o in outcomes.items():
            hr = self.report.host(n)
            if o.ok:
                hr.result, hr.now_on = ROLLED_BACK, back[n]
                self.events.emit(n, f"rolled back to {back[n]}, healthy ({o.seconds:.1f}s)")
            else:
                hr.result = ROLLBACK_FAILED
                hr.detail += f"; rollback to {back[n]} failed: {o.reason}"
                self.events.emit(n, f"rollback to {back[n]} failed: {o.reason}")

    def _finish(self) -> None:
        """Audit lines (when the run went ahead) under the lock, then the lock released on every
        host (``FleetLock.audit_and_release``)."""
        t = time.monotonic()
        report = self.report
        report.finished = releases.now_iso()
        missed: list[str] = []
        if self.went_ahead:
            lines = {h.host: report.audit_line(h.host) for h in report.hosts}
            missed = self.lock.audit_and_release(self.session, self.service or "", lines,
                                                 lambda n: self.probe(self.session.host(n)))
        else:
            self.lock.release()
        if missed:
            self.events.emit(None, f"no audit line on {', '.join(sorted(missed))} "
                                   "(unreachable)")
        report.audit_missing = sorted(missed)
        self._time("finish_s", t)


__all__ = [
    "ABORTED", "Batch", "DEFAULT_BATCH", "Driver", "Events", "FAILED", "FAILED_WITHIN_LIMIT",
    "HEALTHY", "HostResult", "LOCKED", "NOT_REACHED", "NOT_ROLLED_BACK", "OK", "Options",
    "ROLLBACK_FAILED", "ROLLED_BACK", "Report", "RolloutError", "SKIPPED", "Silent", "UNCHANGED",
    "UNREACHABLE", "USAGE", "batch_size", "empty_state", "list_releases", "load_inventory",
    "max_out_of_service", "order_hosts", "plan_batches", "restore_release", "rollback_target",
    "run_deploy_file",
]
