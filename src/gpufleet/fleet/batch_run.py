"""Run a deploy on one batch of hosts, under the watchdog, and say how each host came out.

One pyinfra ``State`` per batch: connect, define the deploy on the hosts, run its operations
while a greenlet probes every host's SSH port. A host that stops answering is cut off and counts
as lost (failed) instead of hanging the batch. When a lost host's greenlet ends pyinfra's run
(its connection was cut), the hosts that were still fine are deployed once more in a fresh
``State``: the deploy is idempotent, so they carry on where they were instead of failing with
the lost host.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pyinfra.api import BaseStateCallback, State
from pyinfra.api.deploy import add_deploy
from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.host import Host
from pyinfra.api.operations import run_ops
from pyinfra.context import ctx_inventory

from gpufleet.fleet import session as fleet_session
from gpufleet.fleet.deploy_results import results_of
from gpufleet.fleet.progress import Progress, failure_reason
from gpufleet.fleet.report import Events
from gpufleet.fleet.watchdog import (
    PROBE_INTERVAL,
    PROBE_MISSES,
    MissedProbes,
    close_connection,
    probe_all,
)
from gpufleet.model import release as releases
from gpufleet.model.release import Release


@dataclass
class Outcome:
    ok: bool
    reason: str = ""
    seconds: float = 0.0
    lost: bool = False
    release: Release | None = None  # the release the deploy handed back for the host


@dataclass(frozen=True)
class Watch:
    """How the watchdog probes: ``probe(host)`` every ``interval`` s, lost after ``misses``."""

    probe: Callable[[Host], bool]
    interval: float = PROBE_INTERVAL
    misses: int = PROBE_MISSES


class BatchRunner:
    """Runs deploys on batches of a session's hosts; adds its timings through ``add_time``
    (``<stage>_ops_s``, ``<stage>_health_wait_s``)."""

    def __init__(self, session: fleet_session.FleetSession, events: Events, watch: Watch,
                 add_time: Callable[[str, float], None],
                 callbacks: Sequence[BaseStateCallback] = ()) -> None:
        self.session, self.events, self.watch, self.add_time = session, events, watch, add_time
        self.callbacks = tuple(callbacks)

    def run(self, names: list[str], verb: str, fn: Callable[..., Any], *args: Any,
            stage: str) -> dict[str, Outcome]:
        """``fn(*args)`` (a ``@deploy``) on the hosts ``names``: host name -> its outcome."""
        outcomes, rerun = self._run_once(names, verb, fn, args, stage, retried=False)
        if rerun:
            again, _ = self._run_once(rerun, verb, fn, args, stage, retried=True)
            outcomes.update(again)
        return outcomes

    def _run_once(self, names: list[str], verb: str, fn: Callable[..., Any],
                  args: tuple[Any, ...], stage: str,
                  retried: bool) -> tuple[dict[str, Outcome], list[str]]:
        """One ``State``: the outcomes, and the hosts to deploy again (see the module)."""
        start = time.monotonic()
        progress = Progress(self.events, verb)
        state = self.session.state(names, progress, *self.callbacks)
        try:
            hosts = fleet_session.connect(state)
            connected = {h.name for h in hosts}
            outcomes = {n: Outcome(False, "unreachable: " + progress.connect_errors.get(
                n, "could not connect"), lost=True) for n in names if n not in connected}
            if not hosts:
                return outcomes, []
            with ctx_inventory.use(state.inventory):
                try:
                    add_deploy(state, fn, *args, host=hosts)
                except PyinfraError as e:  # nothing ran: every host of the batch fails
                    return {**outcomes, **{h.name: Outcome(False, str(e)) for h in hosts}}, []
            lost: dict[str, str] = {}
            rerun = self._execute(state, hosts, lost, progress, stage, retried)
            for h in hosts:
                if h.name not in rerun:
                    took = progress.last_seen.get(h.name, time.monotonic()) - start
                    outcomes[h.name] = self._outcome(state, h, lost, took)
            return outcomes, rerun
        finally:
            fleet_session.shutdown(state)

    def _execute(self, state: State, hosts: list[Host], lost: dict[str, str],
                 progress: Progress, stage: str, retried: bool) -> list[str]:
        """Run the operations under the watchdog; returns the hosts to deploy again."""
        import gevent

        watchdog = gevent.spawn(self._watch_loop, state, hosts, lost)
        started = time.monotonic()
        try:
            run_ops(state)
        except PyinfraError:
            pass  # "No hosts remaining!": every host failed
        except Exception as e:  # noqa: BLE001 - a host's greenlet died
            alive = [h.name for h in hosts if h in state.active_hosts and h.name not in lost]
            if lost and alive and not retried:
                return alive  # a cut-off host ended the run: the others go again
            for name in alive:
                lost[name] = f"the deploy stopped: {type(e).__name__}: {e}"
        finally:
            watchdog.kill()
            self.add_time(f"{stage}_ops_s", time.monotonic() - started)
            self.add_time(f"{stage}_health_wait_s", progress.health_wait)
        return []

    def _outcome(self, state: State, host: Host, lost: dict[str, str], took: float) -> Outcome:
        handed_back = results_of(state).get(host.name)
        release = handed_back.release if handed_back is not None else None
        failed = host in state.failed_hosts
        if failed and host.name not in lost and not self.watch.probe(host):
            lost[host.name] = (f"host lost: no answer on its SSH port after "
                               f"{failure_reason(state, host)}")
        if host.name in lost:
            return Outcome(False, lost[host.name], took, True, release)
        if failed:
            return Outcome(False, failure_reason(state, host), took, release=release)
        return Outcome(True, "", took, release=release)

    def _watch_loop(self, state: State, hosts: list[Host], lost: dict[str, str]) -> None:
        """Probe each host's SSH port; after ``watch.misses`` misses in a row the host is lost:
        its connection is closed, so its running operation fails instead of hanging."""
        import gevent

        missed = MissedProbes(self.watch.misses, releases.now_iso)
        while True:
            gevent.sleep(self.watch.interval)
            watched = [h for h in hosts if h.name not in lost and h in state.active_hosts]
            for host, answered in zip(watched, probe_all(self.watch.probe, watched),
                                      strict=True):
                if missed.record(host.name, answered):
                    lost[host.name] = (f"host lost: no answer on its SSH port since "
                                       f"{missed.since[host.name]} "
                                       f"({missed.missed[host.name]} probes)")
                    self.events.emit(host.name, lost[host.name])
                    close_connection(host, cut=True)
