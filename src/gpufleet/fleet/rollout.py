"""Fleet rollouts and rollbacks on pyinfra's Python API: canary, batches, health gates, abort.

pyinfra has no batches with health gates (``--serial`` takes hosts in random order and a failed
batch does not stop the next), so the driver owns them:

1. **Preflight** (nothing changes): connect to every host, define the deploy on each (this
   computes the release each host will get, see ``operations/releases.release_recorded``),
   read the releases recorded on the hosts and any lock. Unreachable hosts stop here.
2. **Lock** every host: the service's run lock (``gpufleet.fleet.run_lock``), the one every plain
   deploy takes too, held as a lease for the whole run; a held lock refuses the rollout.
3. **Batches**, in a deterministic order (sorted names or ``--order``): the canary hosts, then
   batches of N hosts or P% of the fleet. One pyinfra ``State`` per batch runs the deploy; a
   host is done only when the whole deploy, health gate (``endpoint_verified``) included,
   passed, which is also the only way its release becomes ``current``. A watchdog probes the
   SSH port of every host in the batch and cuts off a host that stops answering (a lost host
   counts as failed instead of hanging the batch).
4. **Failed hosts** are restored to the release they had (its recorded unit, daemon-reload,
   restart, health gate again; image and weights are still on the host: nothing downloads).
   More failed hosts in a batch than ``max_failed`` aborts: later batches are not touched.
5. **Finish** (always, also on errors): an audit line on every host, the lock released.

Planning is pure (``plan_batches``); the pyinfra plumbing needs gevent's monkey-patching,
done by ``gpufleet.cli.fleet`` before pyinfra is imported.
"""

from __future__ import annotations

import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from pyinfra import host as ctx_host_obj
from pyinfra.api import BaseStateCallback, Config, Inventory, State, deploy
from pyinfra.api.arguments import CONNECTOR_ARGUMENT_KEYS, pop_global_arguments
from pyinfra.api.connect import connect_all
from pyinfra.api.deploy import add_deploy
from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.facts import get_fact
from pyinfra.api.host import Host
from pyinfra.api.operations import run_ops
from pyinfra.context import ctx_inventory, ctx_state
from pyinfra.operations import systemd

from gpufleet.facts.release_records import RecordedServices, ReleaseState, empty_state
from gpufleet.fleet import run_lock as hostlock
from gpufleet.model import names
from gpufleet.model import release as releases
from gpufleet.model.spec import SPEC_KEYS
from gpufleet.operations import release_records as release_ops
from gpufleet.operations import vllm

# exit statuses
OK, FAILED_WITHIN_LIMIT, USAGE, ABORTED, UNREACHABLE, LOCKED = 0, 1, 2, 3, 4, 5

HEALTH_OP_MARKER = "Endpoint answers"  # the deploy's endpoint_verified op is named so
DEFAULT_BATCH = "25%"


class RolloutError(PyinfraError):
    """The rollout cannot start: bad options, inventory or deploy. Nothing changed."""


# -- planning (pure) ----------------------------------------------------------------------------


def batch_size(text: str, fleet: int) -> int:
    """``"3"`` -> 3 hosts; ``"25%"`` -> 25% of the fleet, rounded up, at least one."""
    value = str(text).strip()
    try:
        if value.endswith("%"):
            percent = float(value[:-1])
            if not 0 < percent <= 100:
                raise ValueError
            return max(1, math.ceil(fleet * percent / 100 - 1e-9))
        count = int(value)
        if count < 1:
            raise ValueError
        return count
    except ValueError:
        raise RolloutError(f"--batch must be a number of hosts (>= 1) or a percentage of the "
                           f"fleet like 25%, got {text!r}") from None


def order_hosts(names: Iterable[str], order: Sequence[str] | None = None) -> list[str]:
    """Sorted host names; with ``order``, those hosts first in that order, then the rest."""
    names = sorted(set(names))
    order = list(order or [])
    unknown = [n for n in order if n not in names]
    if unknown:
        raise RolloutError(f"--order names hosts that are not in the inventory: "
                           f"{', '.join(unknown)}")
    if len(set(order)) != len(order):
        raise RolloutError("--order names a host twice")
    return order + [n for n in names if n not in order]


@dataclass(frozen=True)
class Batch:
    label: str
    hosts: tuple[str, ...]


def plan_batches(names: Sequence[str], canary: int = 1, batch: str = DEFAULT_BATCH,
                 fleet: int | None = None) -> list[Batch]:
    """Canary batch (the first ``canary`` hosts), then batches of ``batch`` hosts, in order.

    ``fleet``: the size a percentage refers to (default: ``len(names)``)."""
    if canary < 0:
        raise RolloutError(f"--canary must be 0 or more, got {canary}")
    names = list(names)
    size = batch_size(batch, fleet if fleet is not None else len(names))
    out: list[Batch] = []
    if canary and names:
        out.append(Batch("canary", tuple(names[:canary])))
        names = names[canary:]
    for i in range(0, len(names), size):
        out.append(Batch(f"batch {len(out) + 1}", tuple(names[i:i + size])))
    return out


def max_out_of_service(fleet: int, canary: int = 1, batch: str = DEFAULT_BATCH) -> int:
    """The most hosts a rollout takes out of service at once: one batch at a time."""
    return max((len(b.hosts) for b in plan_batches([str(i) for i in range(fleet)], canary,
                                                   batch)), default=0)


# -- report --------------------------------------------------------------------------------------

# host results
HEALTHY = "healthy"
UNCHANGED = "unchanged"
ROLLED_BACK = "failed, rolled back"
ROLLBACK_FAILED = "failed, rollback failed"
NOT_ROLLED_BACK = "failed, nothing to roll back to"
FAILED = "failed"
NOT_REACHED = "not reached"
SKIPPED = "skipped"


@dataclass
class HostResult:
    host: str
    batch: str | None = None
    from_release: str | None = None
    to_release: str | None = None
    result: str = NOT_REACHED
    detail: str = ""
    seconds: float | None = None
    now_on: str | None = None  # the release current on the host when the rollout ended


@dataclass
class Report:
    id: str
    command: str
    by: str
    started: str
    inventory: str
    deploy: str | None = None
    service: str | None = None
    finished: str | None = None
    result: str = "error"
    exit_code: int = USAGE
    message: str = ""
    batches: list[dict[str, Any]] = field(default_factory=list)
    hosts: list[HostResult] = field(default_factory=list)
    lock: dict[str, Any] | None = None
    audit_missing: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def host(self, name: str) -> HostResult:
        return next(h for h in self.hosts if h.host == name)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Events(Protocol):
    """Receives the live progress; the CLI prints it. ``host`` is None for rollout-wide lines."""

    def emit(self, host: str | None, text: str) -> None: ...


class Silent:
    def emit(self, host: str | None, text: str) -> None:
        pass


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
    connect_timeout: int = 10
    probe_interval: float = 2.0
    probe_misses: int = 3


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
def restore_release(service: str, targets: Mapping[str, str]) -> None:
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
    port = int(record.get("port", 8000))
    served = str(record.get("served_name", ""))
    vllm.endpoint_verified(
        name=f"{HEALTH_OP_MARKER} on :{port} as {served!r}", port=port, served_name=served,
        env_file=record.get("env_file", names.env_file(service)),
        container=record.get("container", names.container_name(service)), unit=unit_name,
        timeout=int(record.get("cold_start_timeout", 1200)),
    )
    release_ops.activated(name=f"Release {release_id} current", service=service,
                          release_id=release_id)


# -- pyinfra plumbing -----------------------------------------------------------------------


def load_inventory(path: str, data: Mapping[str, Any] | None = None) -> Inventory:
    """The inventory exactly as ``pyinfra INVENTORY ...`` builds it (file, groups, group_data,
    ``--data`` overrides)."""
    from pyinfra_cli.inventory import make_inventory

    if not os.path.exists(path):
        raise RolloutError(f"inventory {path} does not exist")
    try:
        with ctx_state.use(State()):  # exec_file notes the file it runs on the state
            inventory = make_inventory(path, override_data=dict(data or {}), cwd=os.getcwd())
    except PyinfraError as e:
        raise RolloutError(f"{path}: {e}") from None
    if not len(inventory):
        raise RolloutError(f"inventory {path} has no hosts")
    return inventory


def _connector_args(state: State, host: Host) -> dict[str, Any]:
    arguments, _ = pop_global_arguments(state, host, {})
    return {k: v for k, v in arguments.items() if k in CONNECTOR_ARGUMENT_KEYS}


def _close(host: Host, cut: bool = False) -> None:
    """Close a host's SSH connection (pyinfra's disconnect keeps paramiko's client open).

    ``cut``: only close the transport, so that a command running on it ends (its channel
    closes) and the next one fails with an SSH error pyinfra handles, instead of hanging on a
    host that vanished."""
    client = getattr(getattr(host, "connector", None), "client", None)
    if client is None:
        return
    try:
        if cut:
            transport = client.get_transport()
            if transport is not None:
                transport.close()
        else:
            client.close()
    except Exception:  # noqa: BLE001 - closing a dead connection may fail any way
        pass
    if not cut:
        host.connected = False


def _address(host: Host) -> tuple[str, int] | None:
    """Where the host's SSH server is, for the watchdog (None: not an SSH host)."""
    if getattr(getattr(host, "connector_cls", None), "__name__", "") != "SSHConnector":
        return None
    return (str(host.data.get("ssh_hostname") or host.name), int(host.data.get("ssh_port") or 22))


def tcp_probe(address: tuple[str, int] | None, timeout: float = 2.0) -> bool:
    if address is None:
        return True
    try:
        socket.create_connection(address, timeout=timeout).close()
        return True
    except OSError:
        return False


class _Live(BaseStateCallback):
    """pyinfra callbacks -> live host lines, failure reasons and the time spent in health
    gates."""

    def __init__(self, events: Events, verb: str) -> None:
        self.events, self.verb = events, verb
        self.connect_errors: dict[str, str] = {}
        self.last_seen: dict[str, float] = {}
        self.health_started: float | None = None
        self.health_wait = 0.0

    def host_before_connect(  # type: ignore[override]
        self, state: State, host: Host,
    ) -> None:
        self.events.emit(host.name, "connecting")

    def host_connect(  # type: ignore[override]
        self, state: State, host: Host,
    ) -> None:
        self.events.emit(host.name, self.verb)

    def host_connect_error(  # type: ignore[override]
        self, state: State, host: Host, error: Any,
    ) -> None:
        self.connect_errors[host.name] = str(error)

    def _is_health(self, state: State, op_hash: str) -> bool:
        return any(HEALTH_OP_MARKER in n for n in state.get_op_meta(op_hash).names)

    def operation_start(  # type: ignore[override]
        self, state: State, op_hash: str,
    ) -> None:
        if self._is_health(state, op_hash):
            self.health_started = time.monotonic()

    def operation_end(  # type: ignore[override]
        self, state: State, op_hash: str,
    ) -> None:
        if self._is_health(state, op_hash) and self.health_started is not None:
            self.health_wait += time.monotonic() - self.health_started
            self.health_started = None

    def operation_host_start(  # type: ignore[override]
        self, state: State, host: Host, op_hash: str,
    ) -> None:
        if op_hash in state.ops[host] and self._is_health(state, op_hash):
            self.events.emit(host.name, "waiting for health")

    def operation_host_success(  # type: ignore[override]
        self, state: State, host: Host, op_hash: str, retry_count: int = 0,
    ) -> None:
        self.last_seen[host.name] = time.monotonic()

    def operation_host_error(  # type: ignore[override]
        self, state: State, host: Host, op_hash: str, retry_count: int = 0, max_retries: int = 0,
    ) -> None:
        self.last_seen[host.name] = time.monotonic()


def failure_reason(state: State, host: Host) -> str:
    """The first failed operation of a host, the first line it printed and its last one (the
    verification prints the container's last log lines after its verdict)."""
    for op_hash in state.get_op_order():
        op_data = state.ops[host].get(op_hash)
        if op_data is None or not op_data.operation_meta.is_complete():
            continue
        meta = op_data.operation_meta
        if not meta.did_error():
            continue
        name = sorted(state.get_op_meta(op_hash).names)[0].split(" | ")[-1]
        lines = [ln.strip() for ln in (meta.stderr_lines or meta.stdout_lines) if ln.strip()]
        if not lines:
            return f"{name} failed"
        first = lines[0].removeprefix("gpufleet: ").removeprefix(f"{host.name}: ")
        first = first.split(". Last log lines of ")[0]
        last = f" (last log line: {lines[-1][:160]})" if len(lines) > 1 else ""
        return f"{name}: {first}{last}"
    return "failed"


@dataclass
class Outcome:
    ok: bool
    reason: str = ""
    seconds: float = 0.0
    lost: bool = False
    release: Any = None  # the Release the deploy defined for the host (rollouts)


class Driver:
    """One rollout or rollback over an inventory. ``run()`` never raises for host failures;
    it returns the Report (``exit_code`` included)."""

    def __init__(self, options: Options, events: Events | None = None,
                 inventory: Inventory | None = None,
                 probe: Callable[[Host], bool] | None = None,
                 acquire: Callable[..., hostlock.Lease | None] | None = None) -> None:
        self.opts = options
        self.events: Events = events or Silent()
        self.inventory = inventory
        self.probe = probe or (lambda h: tcp_probe(_address(h)))
        self.acquire = acquire or hostlock.acquire
        self.holder: releases.LockHolder | None = None
        self.leases: dict[str, hostlock.Lease] = {}
        self._lock_state: State | None = None
        self.went_ahead = False
        self.service: str | None = None
        self.states: dict[str, dict[str, Any]] = {}
        self.targets: dict[str, str | None] = {}
        self._planned: dict[str, releases.Release] = {}
        self.report = Report(
            id=uuid.uuid4().hex[:8], command=options.command, by=releases.deployed_by(),
            started=releases.now_iso(), inventory=options.inventory, deploy=options.deploy,
            options={"canary": options.canary if options.command == "rollout" else 0,
                     "batch": options.batch, "pause": options.pause,
                     "max_failed": options.max_failed, "order": options.order,
                     "limit": options.limit, "to": options.to_release,
                     "skip_unreachable": options.skip_unreachable,
                     "data": {k: str(v) if k in SPEC_KEYS else "(set)"
                              for k, v in options.data.items()}},
        )

    # -- small helpers --

    def _time(self, key: str, since: float) -> None:
        self.report.timings[key] = round(self.report.timings.get(key, 0.0)
                                         + time.monotonic() - since, 3)

    def _sub_inventory(self, names: Sequence[str]) -> Inventory:
        assert self.inventory is not None
        hosts = [(n, self.inventory.get_host(n).data.dict()) for n in names]
        return Inventory((hosts, {}), override_data=self.inventory.get_override_data())

    def _state(self, names: Sequence[str], live: _Live | None = None) -> State:
        config = Config(PARALLEL=max(1, len(names)), CONNECT_TIMEOUT=self.opts.connect_timeout)
        state = State(self._sub_inventory(names), config, check_for_changes=False)
        if live is not None:
            state.add_callback_handler(live)
        return state

    @staticmethod
    def _connect(state: State) -> None:
        try:
            connect_all(state)
        except PyinfraError:
            pass  # "No hosts remaining!": every host failed to connect

    @staticmethod
    def _shutdown(state: State) -> None:
        for h in list(state.activated_hosts):
            _close(h)

    def _in_parallel(self, fn: Callable[[Host], Any], hosts: Iterable[Host],
                     timeout: float = 60) -> dict[str, Any]:
        import gevent

        def guarded(h: Host) -> Any:
            try:
                with gevent.Timeout(timeout):
                    return fn(h)
            except gevent.Timeout:
                return TimeoutError(f"no answer within {timeout:.0f}s")
            except Exception as e:  # noqa: BLE001 - reported per host
                return e

        greenlets = {h.name: gevent.spawn(guarded, h) for h in hosts}
        gevent.joinall(list(greenlets.values()))
        return {name: g.value for name, g in greenlets.items()}

    def _shell(self, state: State, hosts: Iterable[Host], command_for: Callable[[Host], Any],
               timeout: float = 60) -> dict[str, tuple[bool, list[str]]]:
        def one(h: Host) -> tuple[bool, list[str]]:
            ok, output = h.run_shell_command(command_for(h), print_output=False,
                                             **_connector_args(state, h))
            return ok, list(output.output_lines)

        out = {}
        for name, value in self._in_parallel(one, hosts, timeout).items():
            out[name] = value if isinstance(value, tuple) else (False, [str(value)])
        return out

    # -- the phases --

    def run(self) -> Report:
        started = time.monotonic()
        try:
            self._run()
        except RolloutError as e:
            self.report.result, self.report.exit_code, self.report.message = "error", USAGE, str(e)
        finally:
            self._finish()
            self.report.finished = releases.now_iso()
            self._time("total_s", started)
        return self.report

    def _run(self) -> None:
        opts, report = self.opts, self.report
        if self.inventory is None:
            self.inventory = load_inventory(opts.inventory, opts.data)
        names = [h.name for h in self.inventory]
        if opts.limit:
            missing = [n for n in opts.limit if n not in names]
            if missing:
                raise RolloutError(f"--limit names hosts that are not in the inventory: "
                                   f"{', '.join(missing)}")
            names = [n for n in names if n in opts.limit]
        ordered = order_hosts(names, opts.order)
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
            return
        if opts.plan_only:
            report.result, report.exit_code = "planned", OK
            report.message = "plan only (--yes to go ahead): nothing changed"
            return
        if opts.confirm is not None and not opts.confirm(report):
            report.result, report.exit_code, report.message = "not confirmed", USAGE, ""
            return

        self.went_ahead = True
        self._batches(batches)

    def _preflight(self, ordered: list[str]) -> list[str] | None:
        """Connect, define, read the hosts' releases and locks. Returns the hosts to work on,
        or None when the rollout must stop here (the report says why)."""
        opts, report = self.opts, self.report
        self.events.emit(None, f"preflight: connecting to {len(ordered)} hosts")
        live = _Live(self.events, "connected")
        state = self._state(ordered, live)
        try:
            self._connect(state)
            down = [n for n in ordered if state.inventory.get_host(n) not in state.active_hosts]
            for n in down:
                hr = report.host(n)
                hr.result, hr.detail = SKIPPED, "unreachable: " + live.connect_errors.get(n, "?")
                self.events.emit(n, f"unreachable: {live.connect_errors.get(n, '?')}")
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
                            else self._discover_service(state, hosts))
            report.service = self.service
            if not opts.plan_only:  # a plan only reads: it takes no lock
                t = time.monotonic()
                locked = self._lock(state, hosts)
                self._time("lock_s", t)
                if not locked:
                    return None
            self.states = self._read_states(state, hosts)
            self.targets = self._choose_targets(state, hosts)
            for n in up:
                hr, st = report.host(n), self.states[n]
                hr.from_release, hr.to_release = st["current"], self.targets.get(n)
            return up
        finally:
            if not self.leases:
                self._shutdown(state)
            else:
                self._lock_state = state  # its connections hold the leases until _finish

    def _define_rollout(self, state: State, hosts: list[Host]) -> str:
        """Define the deploy on every host (nothing runs) to learn the release each host will
        get and the service."""
        opts = self.opts
        path = os.path.abspath(opts.deploy or "")
        if not os.path.isfile(path):
            raise RolloutError(f"deploy file {opts.deploy} does not exist")
        with ctx_inventory.use(state.inventory), hostlock.deferred():
            try:
                add_deploy(state, run_deploy_file, path, host=hosts)
            except PyinfraError as e:
                raise RolloutError(f"{opts.deploy}: {e}") from None
        planned = {h.name: h.data.get(release_ops.DATA_KEY) for h in hosts}
        missing = [n for n, r in planned.items() if r is None]
        if missing:
            raise RolloutError(
                f"{opts.deploy} records no release on {', '.join(missing)}: a rollout needs a "
                "deploy built on gpufleet.deploy.service.vllm_service")
        services = {r.service for r in planned.values()}
        if len(services) != 1:
            raise RolloutError(f"the hosts run different services ({', '.join(services)}): "
                               "roll them out separately (--limit)")
        self._planned = planned
        return services.pop()

    def _discover_service(self, state: State, hosts: list[Host]) -> str:
        """``--service``, else the one service with releases recorded on the hosts."""
        if self.opts.service:
            return self.opts.service
        found = self._in_parallel(
            lambda h: get_fact(state, h, RecordedServices, apply_failed_hosts=False), hosts)
        services = {s for v in found.values() if isinstance(v, list) for s in v}
        if len(services) != 1:
            raise RolloutError("cannot tell which service to roll back: "
                               + (f"the hosts have {', '.join(sorted(services))}"
                                  if services else "no releases recorded on the hosts")
                               + "; pass --service")
        return services.pop()

    def _read_states(self, state: State, hosts: list[Host]) -> dict[str, dict[str, Any]]:
        found = self._in_parallel(
            lambda h: get_fact(state, h, ReleaseState, kwargs={"service": self.service},
                               apply_failed_hosts=False), hosts)
        out = {}
        for name, value in found.items():
            if not isinstance(value, dict):
                raise RolloutError(f"{name}: cannot read its releases: {value}")
            out[name] = value
        return out

    def _choose_targets(self, state: State, hosts: list[Host]) -> dict[str, str | None]:
        if self.opts.command == "rollout":
            return {h.name: self._planned[h.name].id for h in hosts}
        targets: dict[str, str | None] = {}
        for h in hosts:
            st = self.states[h.name]
            target = self.opts.to_release or rollback_target(st)
            targets[h.name] = target
            hr = self.report.host(h.name)
            if target is None:
                hr.result, hr.detail = SKIPPED, "no previous release recorded"
            elif target not in st["releases"]:
                hr.result, hr.detail = SKIPPED, f"release {target} is not recorded here"
        return targets

    def _needs_change(self, name: str) -> bool:
        hr, st = self.report.host(name), self.states[name]
        if hr.result == SKIPPED:
            return False
        target = self.targets.get(name)
        record = st["releases"].get(st["current"] or "", {})
        if target == st["current"] and st["unit_sha256"] == record.get("unit_sha256"):
            hr.result, hr.detail, hr.now_on = UNCHANGED, "already on this release", target
            return False
        return True

    def _refuse_locked(self, held: Mapping[str, Any]) -> None:
        first = next(iter(held.values()))
        self.report.lock = first
        self.report.result, self.report.exit_code = "refused: locked", LOCKED
        self.report.message = (
            f"the {self.service} run lock is held on {', '.join(sorted(held))} by "
            f"{hostlock.describe(first)}; nothing changed. Wait for that run (--wait S), or "
            "end it if it hangs with --break-lock")

    def _lock(self, state: State, hosts: list[Host]) -> bool:
        """Take the service's run lock on every host (a lease held by this run's connections:
        released when the run ends, however it ends). A held lock refuses the whole run."""
        service = self.service or ""
        self.holder = releases.LockHolder(
            id=self.report.id, command=self.opts.command, who=self.report.by, pid=os.getpid(),
            started=self.report.started, hosts=len(hosts),
            release=",".join(sorted({r.id for r in self._planned.values()})) or None)
        if self.opts.break_lock:
            command = hostlock.break_command(service)
            for n, (_ok, lines) in self._shell(state, hosts, lambda h: command).items():
                broken = hostlock.holder_json(lines)
                if broken:
                    self.events.emit(n, f"broke the lock of {hostlock.describe(broken)}")
        results = self._in_parallel(
            lambda h: self.acquire(state, h, service, self.holder, self.opts.wait), hosts,
            timeout=self.opts.wait + 60)
        for name, value in results.items():
            if isinstance(value, hostlock.Lease):
                self.leases[name] = value
        held = {n: v.holder for n, v in results.items()
                if isinstance(v, hostlock.LockError) and v.holder is not None}
        failed = {n: str(v) for n, v in results.items()
                  if isinstance(v, Exception) and n not in held}
        if held:
            self._refuse_locked(held)
        elif failed:
            self.report.result, self.report.exit_code = "refused: lock failed", UNREACHABLE
            self.report.message = "could not take the lock on " + "; ".join(
                f"{n}: {why}" for n, why in sorted(failed.items()))
        if held or failed:
            self._release()
            return False
        self.events.emit(None, f"lock taken on {len(hosts)} hosts "
                               f"({self.opts.command} {self.report.id} by {self.report.by})")
        return True

    def _release(self) -> None:
        for lease in self.leases.values():
            lease.release()
        self.leases = {}
        if self._lock_state is not None:
            self._shutdown(self._lock_state)
            self._lock_state = None

    def _batches(self, batches: list[Batch]) -> None:
        opts, report = self.opts, self.report
        aborted = False
        for i, batch in enumerate(batches):
            if i and opts.pause:
                self.events.emit(None, f"pause {opts.pause:g}s")
                t = time.monotonic()
                time.sleep(opts.pause)
                self._time("pause_s", t)
            self.events.emit(None, f"== {batch.label} ({i + 1}/{len(batches)}): "
                                   f"{', '.join(batch.hosts)}")
            outcomes = self._apply(list(batch.hosts))
            failed = [n for n, o in outcomes.items() if not o.ok]
            for n, o in outcomes.items():
                hr = report.host(n)
                hr.seconds = round(o.seconds, 1)
                if o.release is not None:
                    hr.to_release = o.release.id
                if o.ok:
                    hr.result, hr.now_on = HEALTHY, hr.to_release
                    self.events.emit(n, f"healthy on {hr.to_release} ({o.seconds:.1f}s)")
                else:
                    hr.result, hr.detail = FAILED, o.reason
                    self.events.emit(n, f"failed: {o.reason}")
            if failed:
                self._restore(failed, outcomes)
            if len(failed) > opts.max_failed:
                aborted = True
                rest = [n for b in batches[i + 1:] for n in b.hosts]
                report.message = (f"{batch.label}: {len(failed)} host(s) failed "
                                  f"({', '.join(failed)}), more than --max-failed "
                                  f"{opts.max_failed}; stopped"
                                  + (f", {len(rest)} host(s) not reached: {', '.join(rest)}"
                                     if rest else ""))
                for n in rest:
                    report.host(n).detail = "untouched (rollout stopped)"
                break
        failed_hosts = [h for h in report.hosts if h.result.startswith("failed")]
        skipped = [h.host for h in report.hosts if h.result == SKIPPED]
        if skipped and not aborted:
            report.message = f"{len(skipped)} host(s) skipped: {', '.join(skipped)}"
        if aborted:
            report.result, report.exit_code = "aborted", ABORTED
        elif failed_hosts:
            report.result, report.exit_code = "completed with failures", FAILED_WITHIN_LIMIT
        else:
            report.result, report.exit_code = "completed", OK

    def _apply(self, names: list[str]) -> dict[str, Outcome]:
        """Run the rollout's deploy (or the rollback's restore) on one batch."""
        if self.opts.command == "rollout":
            path = os.path.abspath(self.opts.deploy or "")
            return self._run_deploy(names, "deploying", run_deploy_file, path, stage="deploy")
        targets = {n: t for n, t in self.targets.items() if t}
        return self._run_deploy(names, "restoring", restore_release, self.service, targets,
                                stage="deploy")

    def _restore(self, failed: list[str], outcomes: Mapping[str, Outcome]) -> None:
        """Put failed hosts back on the release they had before this rollout."""
        report = self.report
        back: dict[str, str] = {}
        for n in failed:
            hr = report.host(n)
            before = self.states[n]["current"]
            if before is None or before not in self.states[n]["releases"]:
                hr.result = NOT_ROLLED_BACK
                self.events.emit(n, "no previous release recorded: left as it is")
                continue
            if not self.probe(self._host(n)):
                hr.result = ROLLBACK_FAILED
                hr.detail += "; rollback impossible: the host does not answer"
                self.events.emit(n, "rollback failed: the host does not answer")
                continue
            back[n] = before
        if not back:
            return
        t = time.monotonic()
        outs = self._run_deploy(sorted(back), "rolling back", restore_release, self.service,
                                back, stage="rollback")
        self._time("rollback_s", t)
        for n, o in outs.items():
            hr = report.host(n)
            if o.ok:
                hr.result, hr.now_on = ROLLED_BACK, back[n]
                self.events.emit(n, f"rolled back to {back[n]}, healthy ({o.seconds:.1f}s)")
            else:
                hr.result = ROLLBACK_FAILED
                hr.detail += f"; rollback to {back[n]} failed: {o.reason}"
                self.events.emit(n, f"rollback to {back[n]} failed: {o.reason}")

    def _host(self, name: str) -> Host:
        assert self.inventory is not None
        return self.inventory.get_host(name)

    def _run_deploy(self, names: list[str], verb: str, fn: Callable[..., Any], *args: Any,
                    stage: str, retried: bool = False) -> dict[str, Outcome]:
        """One pyinfra State: connect, define ``fn`` on the hosts, run it under the watchdog.

        When a lost host's greenlet ends pyinfra's run (its connection was cut), the hosts that
        were still fine are deployed once more in a fresh State: the deploy is idempotent, so
        they carry on where they were instead of failing with the lost host."""
        outcomes, rerun = self._run_deploy_once(names, verb, fn, *args, stage=stage,
                                                retried=retried)
        if rerun:
            outcomes.update(self._run_deploy(rerun, verb, fn, *args, stage=stage, retried=True))
        return outcomes

    def _run_deploy_once(self, names: list[str], verb: str, fn: Callable[..., Any], *args: Any,
                         stage: str, retried: bool) -> tuple[dict[str, Outcome], list[str]]:
        import gevent

        start = time.monotonic()
        live = _Live(self.events, verb)
        state = self._state(names, live)
        outcomes: dict[str, Outcome] = {}
        lost: dict[str, str] = {}
        rerun: list[str] = []
        try:
            self._connect(state)
            hosts = [h for h in state.inventory if h in state.active_hosts]
            for n in names:
                if n not in {h.name for h in hosts}:
                    why = live.connect_errors.get(n, "could not connect")
                    outcomes[n] = Outcome(False, f"unreachable: {why}", lost=True)
            if hosts:
                with ctx_inventory.use(state.inventory):
                    try:
                        add_deploy(state, fn, *args, host=hosts)
                    except PyinfraError as e:  # nothing ran: every host of the batch fails
                        for h in hosts:
                            outcomes[h.name] = Outcome(False, str(e))
                        return outcomes, rerun
                watchdog = gevent.spawn(self._watch, state, hosts, lost)
                t = time.monotonic()
                try:
                    run_ops(state)
                except PyinfraError:
                    pass  # "No hosts remaining!": every host failed
                except Exception as e:  # noqa: BLE001 - a host's greenlet died
                    alive = [h.name for h in hosts
                             if h in state.active_hosts and h.name not in lost]
                    if lost and alive and not retried:
                        rerun = alive  # a cut-off host ended the run: the others go again
                    else:
                        for name in alive:
                            lost[name] = f"the deploy stopped: {type(e).__name__}: {e}"
                finally:
                    watchdog.kill()
                    self._time(f"{stage}_ops_s", t)
                    self.report.timings[f"{stage}_health_wait_s"] = round(
                        self.report.timings.get(f"{stage}_health_wait_s", 0) + live.health_wait,
                        3)
            for h in hosts:
                if h.name in rerun:
                    continue
                took = live.last_seen.get(h.name, time.monotonic()) - start
                release = h.data.get(release_ops.DATA_KEY)
                if h in state.failed_hosts and h.name not in lost and not self.probe(h):
                    lost[h.name] = (f"host lost: no answer on its SSH port after "
                                    f"{failure_reason(state, h)}")
                if h.name in lost:
                    outcomes[h.name] = Outcome(False, lost[h.name], took, True, release)
                elif h in state.failed_hosts:
                    outcomes[h.name] = Outcome(False, failure_reason(state, h), took,
                                               release=release)
                else:
                    outcomes[h.name] = Outcome(True, "", took, release=release)
            return outcomes, rerun
        finally:
            self._shutdown(state)

    def _watch(self, state: State, hosts: list[Host], lost: dict[str, str]) -> None:
        """Probe each host's SSH port; after ``probe_misses`` misses in a row the host is lost:
        its connection is closed, so its running operation fails instead of hanging."""
        import gevent

        misses = {h.name: 0 for h in hosts}
        since: dict[str, str] = {}
        while True:
            gevent.sleep(self.opts.probe_interval)
            watched = [h for h in hosts if h.name not in lost and h in state.active_hosts]
            for name, ok in self._in_parallel(self.probe, watched, timeout=30).items():
                if ok is True:
                    misses[name] = 0
                    continue
                misses[name] += 1
                since.setdefault(name, releases.now_iso())
                if misses[name] >= self.opts.probe_misses:
                    host = state.inventory.get_host(name)
                    lost[name] = (f"host lost: no answer on its SSH port since "
                                  f"{since[name]} ({misses[name]} probes)")
                    self.events.emit(name, lost[name])
                    _close(host, cut=True)

    def _finish(self) -> None:
        """Audit lines (when the run went ahead) under the lock, then the lock released on every
        host; a host lost on the way gets its audit line through a new connection if it
        answers again."""
        t = time.monotonic()
        report = self.report
        report.finished = releases.now_iso()
        missed: list[str] = []
        if self.went_ahead:
            for name in [h.host for h in report.hosts if h.host in self.leases]:
                # a host that does not answer its SSH port cannot answer on its lease either
                if not self.probe(self._host(name)) or not self.leases[name].audit(
                        self._audit_line(name)):
                    missed.append(name)
        for name in missed:
            self.leases.pop(name).release(timeout=1)  # its host is gone: do not wait for it
        self._release()
        reachable = [n for n in missed if self.probe(self._host(n))]
        if reachable:
            state = self._state(reachable)
            try:
                self._connect(state)
                hosts = [h for h in state.inventory if h in state.active_hosts]
                results = self._shell(state, hosts, lambda h: release_ops.audit_command(
                    self.service or "", self._audit_line(h.name)))
                missed = [n for n in missed if not results.get(n, (False, []))[0]]
            finally:
                self._shutdown(state)
        if missed:
            self.events.emit(None, f"no audit line on {', '.join(sorted(missed))} "
                                   "(unreachable)")
        report.audit_missing = sorted(missed)
        self._time("finish_s", t)

    def _audit_line(self, name: str) -> str:
        hr, report = self.report.host(name), self.report
        entry = releases.AuditEntry(
            rollout=report.id, command=report.command, by=report.by, started=report.started,
            finished=report.finished or releases.now_iso(),
            result=report.result if report.result != "error" else "error",
            host=name, batch=hr.batch, from_release=hr.from_release, to_release=hr.to_release,
            host_result=hr.result, seconds=hr.seconds, options=report.options)
        return entry.to_json()


def rollback_target(state: Mapping[str, Any]) -> str | None:
    """Where ``gpufleet rollback`` takes a host by default: back to ``current`` when the unit in
    place is not current's (a deploy that never passed its health gate), else to ``previous``."""
    current = state.get("current")
    record = state.get("releases", {}).get(current or "", {})
    if current and state.get("unit_sha256") != record.get("unit_sha256"):
        return current
    return state.get("previous")


# -- ``gpufleet releases`` -----------------------------------------------------------------


def list_releases(inventory_path: str, service: str | None = None,
                  data: Mapping[str, Any] | None = None, limit: Sequence[str] | None = None,
                  inventory: Inventory | None = None) -> tuple[str, list[dict[str, Any]]]:
    """Per host: current, previous, when current was created, and any lock."""
    opts = Options(command="releases", inventory=inventory_path, data=dict(data or {}),
                   service=service, limit=list(limit or []) or None)
    driver = Driver(opts, inventory=inventory)
    driver.inventory = driver.inventory or load_inventory(inventory_path, data)
    names = order_hosts([h.name for h in driver.inventory])
    if limit:
        names = [n for n in names if n in limit]
    state = driver._state(names, _Live(Silent(), ""))
    rows: list[dict[str, Any]] = []
    try:
        driver._connect(state)
        hosts = [h for h in state.inventory if h in state.active_hosts]
        svc = driver._discover_service(state, hosts) if hosts else (service or "?")
        driver.service = svc
        found = driver._read_states(state, hosts) if hosts else {}
        for n in names:
            st = found.get(n)
            if st is None:
                rows.append({"host": n, "error": "unreachable"})
                continue
            cur = st["releases"].get(st["current"] or "", {})
            rows.append({
                "host": n, "current": st["current"], "previous": st["previous"],
                "created": cur.get("created"), "image": cur.get("image"),
                "quantization": cur.get("quantization"), "deployed_by": cur.get("deployed_by"),
                "drift": bool(st["current"]) and st["unit_sha256"] != cur.get("unit_sha256"),
                "lock": st["lock"] if st["locked"] else None,
                "kept": sorted(st["releases"]),
            })
        return svc, rows
    finally:
        driver._shutdown(state)


__all__ = [
    "ABORTED", "Batch", "Driver", "Events", "HostResult", "LOCKED", "OK", "Options", "Report",
    "RolloutError", "UNREACHABLE", "USAGE", "batch_size", "empty_state", "list_releases",
    "load_inventory", "max_out_of_service", "order_hosts", "plan_batches",
    "restore_release", "rollback_target", "run_deploy_file",
]
