"""``gpufleet snapshot``: a provisioned droplet as a golden image, without its secrets.

1. **Scrub**: under the service's run lock (``flock -n``: a run in progress is not cut short),
   the unit and the front's nginx are stopped and disabled, and every secret file (the API
   key's env file, the Hub token file, the front's key check and TLS key) is removed, then the
   disk is synced. The snapshot keeps what makes a server slow to build
   (toolkit, daemon.json, the pulled image, the staged weights, the release records) and none
   of the secrets. A host rebuilt from it gets them from the deploy, as any host does (the API
   key from the controller's state, the token from the environment): they are not rotated,
   they are never on a snapshot.
2. **Power off** (``shutdown``, DigitalOcean's advice for a consistent snapshot),
   **snapshot**, **power on**, each action followed to ``completed``.
3. **Deploy** that host again (run lock, health gate): it writes the secrets back and starts
   the server, and serves on the release it had.

The host is out of service meanwhile, so the service's last healthy host is refused unless
``force``.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass

from gpufleet.clients.digitalocean import Action, DigitalOceanClient, DigitalOceanError
from gpufleet.fleet import recovery
from gpufleet.fleet import session as fleet_session
from gpufleet.fleet.report import OK, Events, RolloutError
from gpufleet.model import names

SNAPSHOT_PHASES = ("scrub", "power off", "snapshot", "power on")
LOCK_HELD_EXIT = 75


@dataclass
class SnapshotResult:
    snapshot_id: int | None = None
    name: str = ""
    size_gigabytes: float | None = None
    scrubbed: tuple[str, ...] = ()


def scrub_command(service: str) -> str:
    """Stop the server and remove the secrets, holding the run lock (exit 75: a run holds it)."""
    unit = names.unit_name(service)
    secrets = names.secret_files(service)
    # the front too: its nginx cannot start without the key check it includes (a host
    # booted from the snapshot gets both back from its deploy)
    inner = (f"systemctl disable --now {shlex.quote(unit)} && "
             "{ systemctl disable --now nginx.service 2>/dev/null || true; } && "
             f"rm -f {' '.join(map(shlex.quote, secrets))} "
             f"{names.WEIGHTS_PEER_FILES} && sync")
    return (f"mkdir -p {shlex.quote(names.service_dir(service))} && "
            f"flock -n -E {LOCK_HELD_EXIT} {shlex.quote(names.lock_path(service))} "
            f"sh -c {shlex.quote(inner)}")


class GoldenSnapshot(recovery.Recovery):
    """One ``gpufleet snapshot``: ``run()`` returns the report (``snapshot`` holds the id)."""

    deploy_hint = " (the snapshot is taken)"

    def __init__(self, opts: recovery.RebuildOptions, events: Events | None = None,
                 client: DigitalOceanClient | None = None, *, name: str) -> None:
        super().__init__(opts, events, client)
        self.snapshot = SnapshotResult(name=name)

    def _plan(self, fleet: int) -> None:
        name = self.opts.hosts[0]
        if self.report.service is None:
            raise RolloutError(f"{name} serves no gpufleet service: deploy it before taking "
                               "a golden image of it")
        if name in self.healthy and not (self.healthy - {name}) and not self.opts.force:
            raise RolloutError(f"{name} is the service's last healthy host and is out of "
                               "service while it is snapshotted; pass --force to go ahead")
        self.report.batches = [[name]]
        self.report.host(name).batch = "batch 1"

    def _batches(self, session: fleet_session.FleetSession) -> None:
        name = self.opts.hosts[0]
        hr, report = self.report.host(name), self.report
        try:
            self._take(session, name)
        except (DigitalOceanError, RolloutError) as e:
            failure = str(e)
            self.events.emit(name, f"failed: {failure}")
            if self.snapshot.scrubbed:  # its server is stopped, its secrets gone: back to serving
                self._deploy(session, [name])
                back = ("it serves again" if hr.result == recovery.REBUILT
                        else f"and the deploy to bring it back failed too: {hr.detail}")
                failure = f"{failure}; {back}"
            hr.result, hr.detail = recovery.FAILED, failure
            report.result, report.exit_code = "failed", recovery.FAILED_WITHIN_LIMIT
            report.message = failure
            return
        self._deploy(session, [name])
        if hr.result == recovery.REBUILT:
            hr.result = "snapshotted"
            report.result, report.exit_code = "completed", OK
        else:
            report.result, report.exit_code = "failed", recovery.FAILED_WITHIN_LIMIT
            report.message = hr.detail

    def _take(self, session: fleet_session.FleetSession, name: str) -> None:
        hr, service = self.report.host(name), self.report.service
        assert service is not None
        t0 = time.monotonic()
        state = session.state([name])
        try:
            hosts = fleet_session.connect(state)
            if not hosts:
                raise RolloutError(f"{name} does not answer on SSH; nothing changed")
            ok, lines = fleet_session.shell(state, hosts, lambda h: scrub_command(service),
                                            timeout=300)[name]
        finally:
            fleet_session.shutdown(state)
        if not ok:
            raise RolloutError(f"could not stop the server and remove its secrets on {name}: "
                               + (" ".join(lines)[-500:] or "no output")
                               + "; if a gpufleet run holds the lock, wait for it to end")
        self.snapshot.scrubbed = names.secret_files(service)
        hr.phases["scrub"] = time.monotonic() - t0
        self.events.emit(name, f"server stopped, secrets removed ({hr.phases['scrub']:.0f}s)")
        self._action(name, "power off", "shutdown")
        try:
            action = self._action(name, "snapshot", "snapshot", name=self.snapshot.name)
        except DigitalOceanError as e:
            try:
                self._action(name, "power on", "power_on")
                back = "it is powered on again"
            except DigitalOceanError as again:
                back = f"powering it on failed too ({again}): power it on in the console"
            raise DigitalOceanError(f"the snapshot of {name} failed: {e}; {back}") from None
        found = [s for s in self.client.list_snapshots(hr.droplet_id)
                 if s.name == self.snapshot.name]
        if found:
            self.snapshot.snapshot_id = found[-1].id
            self.snapshot.size_gigabytes = found[-1].size_gigabytes
        self.events.emit(name, f"snapshot {self.snapshot.snapshot_id} {self.snapshot.name!r} "
                               f"taken (action {action.id})")
        self._action(name, "power on", "power_on")
        host = session.host(name)
        t1 = time.monotonic()
        key = self._wait_for_key(str(host.data.get("ssh_hostname") or name),
                                 int(host.data.get("ssh_port") or 22))
        hr.phases["power on"] += time.monotonic() - t1
        if key is None:
            raise RolloutError(f"{name} did not come back on SSH after its power-on; the "
                               f"snapshot {self.snapshot.snapshot_id} is taken. Open the "
                               "droplet's console, then deploy it again")

    def _action(self, host: str, phase: str, kind: str, **params: str) -> Action:
        hr = self.report.host(host)
        t0 = time.monotonic()
        done = self._follow(host, self.client.droplet_action(hr.droplet_id, kind, **params))
        hr.phases[phase] = time.monotonic() - t0
        self.events.emit(host, f"{kind} action {done.id} completed ({hr.phases[phase]:.0f}s)")
        return done
