"""``gpufleet rebuild`` and ``gpufleet drill``: lost droplets back to verified servers, timed.

For each batch of hosts (one host per batch by default):

1. **API action**: DigitalOcean rebuilds the droplet from its own image, another image or a
   snapshot (``POST /v2/droplets/{id}/actions`` ``type=rebuild``), followed to ``completed``.
2. **Boot to SSH**: the rebuilt droplet's SSH port is polled until it presents a host key.
   Only then, with the API's word that the rebuild is done, that one key replaces the
   droplet's entries in the project's known_hosts (``gpufleet.fleet.known_hosts``), its
   fingerprint in the output. Every other entry is kept; checking is never turned off.
3. **Deploy**: the user's deploy on those hosts, through the rollout driver (its run lock, its
   health gate), timed by phase (``gpufleet.fleet.phases``): toolkit and docker, image pull,
   weights, cold start, verification.

Everything that defines a server is pinned, so a rebuilt host comes back on the release it
had. Hosts out of service never outnumber one batch, and the service's last healthy host is
never taken down unless ``force``; a drill (one host, on purpose) never takes it at all.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyinfra.api import Inventory
from pyinfra.api.facts import get_fact
from pyinfra.api.host import Host

from gpufleet.clients import do_inventory
from gpufleet.clients.digitalocean import Action, DigitalOceanClient, DigitalOceanError
from gpufleet.facts.release_records import RecordedServices, ReleaseState
from gpufleet.facts.vllm import VllmEndpoint
from gpufleet.fleet import known_hosts
from gpufleet.fleet import session as fleet_session
from gpufleet.fleet.batches import plan_batches
from gpufleet.fleet.phases import DEPLOY_PHASES, PhaseTimer
from gpufleet.fleet.report import (
    ABORTED,
    FAILED_WITHIN_LIMIT,
    OK,
    USAGE,
    Events,
    RolloutError,
    Silent,
)
from gpufleet.model import names as host_names
from gpufleet.model.release import endpoint_of

PHASES = ("api action", "boot to ssh", *DEPLOY_PHASES)
REBUILT, FAILED, NOT_REACHED = "rebuilt", "failed", "not reached"


def phase_order(phases: Mapping[str, float]) -> list[str]:
    """The phases in the order a run goes through them (a snapshot's own ones first)."""
    return [p for p in phases if p not in PHASES] + [p for p in PHASES if p in phases]


@dataclass
class RebuildOptions:
    inventory: str
    deploy: str
    hosts: list[str]
    command: str = "rebuild"  # or "drill"
    image: str | None = None  # a slug or image id; default: the droplet's own image
    snapshot: int | None = None
    batch: str = "1"
    force: bool = False
    data: dict[str, Any] = field(default_factory=dict)
    confirm: Callable[[RecoveryReport], bool] | None = None  # None: go ahead (--yes)
    action_timeout: float = 1800.0
    ssh_timeout: float = 900.0
    poll: float = 5.0


@dataclass
class HostRecovery:
    host: str
    droplet_id: int
    addresses: list[str]
    image: str = ""
    batch: str | None = None
    healthy_before: bool = False
    release_before: str | None = None
    release_after: str | None = None
    result: str = NOT_REACHED
    detail: str = ""
    fingerprint: str | None = None
    phases: dict[str, float] = field(default_factory=dict)
    changed: list[str] = field(default_factory=list)  # the deploy's operations that changed

    @property
    def total_s(self) -> float:
        return round(sum(self.phases.values()), 1)


@dataclass
class RecoveryReport:
    command: str
    inventory: str
    service: str | None = None
    hosts: list[HostRecovery] = field(default_factory=list)
    batches: list[list[str]] = field(default_factory=list)
    result: str = "error"
    exit_code: int = USAGE
    message: str = ""

    def host(self, name: str) -> HostRecovery:
        return next(h for h in self.hosts if h.host == name)

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        for h, d in zip(self.hosts, doc["hosts"], strict=True):
            d["phases"] = {p: round(h.phases[p], 1) for p in phase_order(h.phases)}
            d["total_s"] = h.total_s
        return doc


class Recovery:
    """One rebuild or drill. ``run()`` returns the report; it raises only ``RolloutError`` for
    bad input found before anything changed."""

    deploy_hint = " (the droplet is rebuilt, SSH trusts its new key)"

    def __init__(self, opts: RebuildOptions, events: Events | None = None,
                 client: DigitalOceanClient | None = None,
                 inventory: Inventory | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        self.opts = opts
        self.events: Events = events or Silent()
        self.environ = os.environ if environ is None else environ
        self._client = client
        self.inventory = inventory
        self.report = RecoveryReport(command=opts.command, inventory=opts.inventory)

    @property
    def client(self) -> DigitalOceanClient:
        if self._client is None:
            try:
                settings = do_inventory.settings_from_env(self.environ)
            except do_inventory.InventoryError as e:
                raise RolloutError(str(e)) from None
            self._client = DigitalOceanClient(settings.token, settings.api_url)
        return self._client

    # -- before anything changes -------------------------------------------------------------

    def run(self) -> RecoveryReport:
        opts, report = self.opts, self.report
        if not opts.hosts:
            raise RolloutError("name the hosts to rebuild")
        if opts.command == "drill" and len(opts.hosts) != 1:
            raise RolloutError("a drill rebuilds exactly one host")
        if opts.image is not None and opts.snapshot is not None:
            raise RolloutError("--image and --snapshot exclude each other")
        if not os.path.isfile(opts.deploy):
            raise RolloutError(f"deploy file {opts.deploy} does not exist")
        if self.inventory is None:
            self.inventory = fleet_session.load_inventory(opts.inventory, opts.data)
        session = fleet_session.FleetSession(self.inventory)
        missing = [n for n in opts.hosts if n not in session.names()]
        if missing:
            raise RolloutError(f"not in the inventory: {', '.join(missing)}")
        report.hosts = [self._describe(session.host(n)) for n in opts.hosts]
        self._read_fleet(session)
        self._plan(fleet=len(session.names()))
        if opts.confirm is not None and not opts.confirm(report):
            report.result, report.message = "not confirmed", "nothing changed"
            return report
        self._batches(session)
        return report

    def _describe(self, host: Host) -> HostRecovery:
        droplet_id = host.data.get("droplet_id")
        if droplet_id is None:
            raise RolloutError(f"{host.name}: the inventory names no droplet id (use "
                               "inventories/do.py)")
        try:
            droplet = self.client.get_droplet(int(droplet_id))
        except DigitalOceanError as e:
            raise RolloutError(f"{host.name}: {e}") from None
        if self.opts.snapshot is not None:
            image = str(self.opts.snapshot)
            if self.opts.snapshot not in {s.id for s in self._snapshots()}:
                raise RolloutError(f"snapshot {self.opts.snapshot} does not exist (gpufleet "
                                   f"snapshots {self.opts.inventory} lists them)")
        else:
            image = self.opts.image or droplet.image_slug or str(droplet.image_id or "")
        if not image:
            raise RolloutError(f"{host.name}: droplet {droplet.id} has no image to rebuild "
                               "from: pass --image SLUG or --snapshot ID")
        addresses = [a for a in (droplet.public_ipv4, droplet.private_ipv4) if a]
        return HostRecovery(host=host.name, droplet_id=droplet.id, addresses=addresses,
                            image=image)

    def _snapshots(self) -> list[Any]:
        try:
            return self.client.list_droplet_snapshots()
        except DigitalOceanError as e:
            raise RolloutError(str(e)) from None

    def _read_fleet(self, session: fleet_session.FleetSession) -> None:
        """The service, each host's current release and whether it serves now (the hosts that
        do not answer are not healthy)."""
        state = session.state(session.names())
        try:
            hosts = fleet_session.connect(state)
            found = fleet_session.in_parallel(
                lambda h: get_fact(state, h, RecordedServices, apply_failed_hosts=False), hosts)
            services = {s for v in found.values() if isinstance(v, list) for s in v}
            if len(services) > 1:
                raise RolloutError(f"the hosts run several services ({', '.join(services)})")
            self.report.service = service = services.pop() if services else None
            self.healthy: set[str] = set()
            if service is not None:
                for h in hosts:
                    self._read_host(state, h, service)
            self._check_deploy(state, hosts)
        finally:
            fleet_session.shutdown(state)

    def _check_deploy(self, state: Any, hosts: list[Host]) -> None:
        """Define the deploy (nothing runs) on one host that answers, a target first: bad
        ``--data``, a missing token or a gated model stop here, before any droplet is wiped."""
        from gpufleet.fleet.rollout import define_rollout

        targets = {h.host for h in self.report.hosts}
        ordered = sorted(hosts, key=lambda h: (h.name not in targets, h.name not in self.healthy))
        if not ordered:
            return
        planned = define_rollout(state, ordered[:1], self.opts.deploy)
        for release in planned.values():
            if self.report.service is None:
                self.report.service = release.service

    def _read_host(self, state: Any, host: Host, service: str) -> None:
        try:
            rs = get_fact(state, host, ReleaseState, kwargs={"service": service},
                          apply_failed_hosts=False)
            record = rs["releases"].get(rs["current"] or "", {})
            probe = get_fact(state, host, VllmEndpoint, kwargs={
                "url": endpoint_of(record), "url_file": host_names.front_url_file(service),
                "served_name": str(record.get("served_name", "")),
                "env_file": record.get("env_file", ""), "container": record.get("container", ""),
                "unit": record.get("unit_name", "")}, apply_failed_hosts=False) if record else {}
        except Exception:  # noqa: BLE001 - a host that cannot say is not healthy
            return
        if probe.get("ok"):
            self.healthy.add(host.name)
        if host.name in self.opts.hosts:
            hr = self.report.host(host.name)
            hr.release_before = rs["current"]
            hr.healthy_before = host.name in self.healthy

    def _plan(self, fleet: int) -> None:
        """Batches: hosts already out of service first, then the healthy ones; refuse to take
        the last healthy host (a drill: ever; a rebuild: unless forced)."""
        opts, report = self.opts, self.report
        targets = [h.host for h in report.hosts]
        healthy_targets = [n for n in targets if n in self.healthy]
        others = self.healthy - set(targets)
        if opts.command == "drill":
            if not healthy_targets:
                raise RolloutError(
                    f"{targets[0]} is not healthy: a drill times the recovery of a serving "
                    f"host; to bring this one back, gpufleet rebuild {opts.inventory} "
                    f"{targets[0]}")
            if not others:
                raise RolloutError(
                    f"a drill never rebuilds the last healthy host of the service: "
                    f"{targets[0]} would leave no host serving")
        elif healthy_targets and not others and not opts.force:
            raise RolloutError(
                f"{', '.join(healthy_targets)} would take the service's last healthy host out "
                "of service; rebuild the others first, or pass --force")
        down = [n for n in targets if n not in self.healthy]
        batches = plan_batches(healthy_targets, 0, opts.batch, fleet=fleet)
        report.batches = ([down] if down else []) + [list(b.hosts) for b in batches]
        for i, batch in enumerate(report.batches):
            for n in batch:
                report.host(n).batch = f"batch {i + 1}"

    # -- the rebuild ---------------------------------------------------------------------------

    def _batches(self, session: fleet_session.FleetSession) -> None:
        report = self.report
        for i, names in enumerate(report.batches):
            self.events.emit(None, f"== batch {i + 1}/{len(report.batches)}: {', '.join(names)}")
            up = self._rebuild_and_boot(session, names)
            if up:
                self._deploy(session, up)
            failed = [n for n in names if report.host(n).result != REBUILT]
            if failed:
                rest = [n for b in report.batches[i + 1:] for n in b]
                report.result = "aborted" if rest else "completed with failed hosts"
                report.exit_code = ABORTED if rest else FAILED_WITHIN_LIMIT
                report.message = (f"{len(failed)} host(s) failed: {', '.join(failed)}"
                                  + (f"; not touched: {', '.join(rest)}" if rest else ""))
                return
        report.result, report.exit_code = "completed", OK

    def _rebuild_and_boot(self, session: fleet_session.FleetSession,
                          names: Sequence[str]) -> list[str]:
        """API action and boot to SSH on a batch at once; the hosts that came back."""
        results = fleet_session.in_parallel(
            lambda h: self._one(session, h.name), [session.host(n) for n in names],
            timeout=self.opts.action_timeout + self.opts.ssh_timeout + 60)
        up = []
        for name, value in results.items():
            hr = self.report.host(name)
            if value is True:
                up.append(name)
            else:
                hr.result = FAILED
                hr.detail = hr.detail or str(value)
                self.events.emit(name, f"failed: {hr.detail}")
        return up

    def _one(self, session: fleet_session.FleetSession, name: str) -> bool:
        hr, opts = self.report.host(name), self.opts
        t0 = time.monotonic()
        try:
            action = self.client.rebuild(hr.droplet_id, _image_arg(hr.image))
        except DigitalOceanError as e:
            hr.detail = f"the API refused the rebuild ({e}); nothing changed on the droplet"
            return False
        self.events.emit(name, f"rebuild from {hr.image}: action {action.id} {action.status}")
        try:
            done = self._follow(name, action)
        except DigitalOceanError as e:
            hr.phases["api action"] = time.monotonic() - t0
            hr.detail = (f"{e}; the droplet may be half rebuilt: see its page in the DigitalOcean "
                         f"console, then run gpufleet {opts.command} again for {name}")
            return False
        hr.phases["api action"] = time.monotonic() - t0
        self.events.emit(name, f"rebuild action {done.id} completed "
                               f"({hr.phases['api action']:.0f}s)")
        host = session.host(name)
        port = int(host.data.get("ssh_port") or 22)
        address = str(host.data.get("ssh_hostname") or name)
        t1 = time.monotonic()
        key = self._wait_for_key(address, port)
        hr.phases["boot to ssh"] = time.monotonic() - t1
        if key is None:
            hr.detail = (f"no SSH on {address}:{port} within {opts.ssh_timeout:.0f}s of the "
                         "rebuild; open the droplet's recovery console in the DigitalOcean "
                         f"console; known_hosts is unchanged. Then run gpufleet {opts.command} "
                         f"again for {name}")
            return False
        path = _known_hosts_file(host)
        addresses = list(dict.fromkeys([address, *hr.addresses]))
        known_hosts.replace_in_file(path, addresses, key, port)
        hr.fingerprint = key.fingerprint
        self.events.emit(name, f"SSH up after {hr.phases['boot to ssh']:.0f}s; new host key "
                               f"{key.type} {key.fingerprint} recorded for "
                               f"{', '.join(addresses)} in {path}")
        return True

    def _follow(self, name: str, action: Action) -> Action:
        """The action, once ``completed``; polled after 1, 2, 3 s, then every ``poll`` s (a
        short action is timed to the second, a long one costs few API calls)."""
        deadline = time.monotonic() + self.opts.action_timeout
        last, kind = action.status, action.type or "the"
        for waited in itertools.count(1):
            if action.status == "completed":
                return action
            if action.status == "errored":
                raise DigitalOceanError(f"{kind} action {action.id} errored")
            if time.monotonic() > deadline:
                raise DigitalOceanError(
                    f"{kind} action {action.id} still {action.status} after "
                    f"{self.opts.action_timeout:.0f}s")
            time.sleep(min(float(waited), self.opts.poll))
            action = self.client.get_action(action.id)
            if action.status != last and action.status != "completed":
                last = action.status
                self.events.emit(name, f"{kind} action {action.id} {action.status}")
        raise AssertionError("unreachable")

    def _wait_for_key(self, address: str, port: int) -> known_hosts.HostKey | None:
        deadline = time.monotonic() + self.opts.ssh_timeout
        while time.monotonic() < deadline:
            try:
                return known_hosts.scan(address, port, timeout=5)
            except known_hosts.KeyScanError:
                time.sleep(min(self.opts.poll, 2.0))
        return None

    def _deploy(self, session: fleet_session.FleetSession, names: list[str]) -> None:
        """The deploy on the hosts ``names``, their weights from a healthy peer."""
        from gpufleet.fleet import rollout

        timer = PhaseTimer()
        driver = rollout.Driver(
            rollout.Options(command="rollout", inventory=self.opts.inventory,
                            deploy=self.opts.deploy, data=self.opts.data, canary=0,
                            batch=str(len(names)), limit=names, redeploy=True),
            self.events, inventory=session.inventory, callbacks=[timer])
        with peer_offered(session, sorted(self.healthy - set(names)), self.events):
            result = driver.run()
        for name in names:
            hr, out = self.report.host(name), result.host(name)
            hr.phases.update(timer.seconds.get(name, {}))
            hr.changed = timer.changed.get(name, [])
            hr.release_after = out.now_on or out.to_release
            if out.result == rollout.HEALTHY:
                hr.result = REBUILT
                self.events.emit(name, f"back on {hr.release_after}: recovery "
                                       f"{hr.total_s:.0f}s")
            else:
                hr.result = FAILED
                why = out.detail or result.message or out.result
                hr.detail = (f"the deploy after the {self.opts.command} failed: {why}; fix it "
                             f"and run pyinfra {self.opts.inventory} {self.opts.deploy} "
                             f"--limit {name}" + self.deploy_hint)


@contextmanager
def peer_offered(session: fleet_session.FleetSession, healthy: Sequence[str],
                 events: Events) -> Iterator[None]:
    """The first healthy host offered, while the block runs, as the peer the deployed hosts
    take their weights from (``gpufleet.deploy.weight_peers``; the Hub when it cannot serve)."""
    from gpufleet.deploy import weight_peers

    state = session.state(list(healthy[:1])) if healthy else None
    try:
        if state is not None and (connected := fleet_session.connect(state)):
            weight_peers.offer(state, connected[0])
            events.emit(None, f"weights: {connected[0].name} is offered as the peer")
        yield
    finally:
        weight_peers.close_all()
        if state is not None:
            fleet_session.shutdown(state)


def _image_arg(image: str) -> str | int:
    return int(image) if image.isdigit() else image


def _known_hosts_file(host: Host) -> Path:
    path = host.data.get("ssh_known_hosts_file") or do_inventory.DEFAULT_KNOWN_HOSTS
    return Path(os.path.expanduser(str(path)))
