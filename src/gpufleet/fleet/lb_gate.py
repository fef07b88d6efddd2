"""The rollout's load-balancer gate: no client request reaches a restarting server.

Before a batch is deployed, its droplets lose the load balancer's tag (``<tag>-lb``, see
``gpufleet.model.cloud``) and the rollout waits ``drain`` seconds: the load balancer stops sending
them new requests and those in flight finish. After a host passed its own health gate it gets the
tag back, and the rollout waits out the load balancer's own admission: one check interval for it
to see the tag, then ``healthy_threshold`` passed checks. DigitalOcean's API does not show a
backend's health, so that wait is the load balancer's own settings, read from the API.

The gate is on when the inventory's hosts are droplets (their data has ``droplet_id``), the
environment has the inventory's token and the service's load balancer exists.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from gpufleet.clients.digitalocean import DigitalOceanClient, DigitalOceanError
from gpufleet.clients.do_inventory import InventoryError, settings_from_env
from gpufleet.model import cloud

DEFAULT_DRAIN = 15.0


class GateError(Exception):
    """The load balancer could not be told; the host's restart does not go ahead."""


@dataclass
class LoadBalancerGate:
    client: DigitalOceanClient
    tag: str
    lb: dict[str, Any]
    drain: float = DEFAULT_DRAIN
    sleep: Callable[[float], None] = time.sleep
    emit: Callable[[str | None, str], None] = lambda _host, _text: None
    add_time: Callable[[str, float], None] = lambda _key, _seconds: None

    @property
    def lb_tag(self) -> str:
        return cloud.lb_tag(self.tag)

    @property
    def admission_seconds(self) -> float:
        """One check interval to see the tag, then the healthy threshold's checks."""
        check = self.lb.get("health_check") or {}
        interval = float(check.get("check_interval_seconds") or 10)
        return interval * (1 + int(check.get("healthy_threshold") or 3))

    def describe(self) -> str:
        return (f"load balancer {self.lb.get('name')} ({self.lb.get('ip')}): hosts leave it "
                f"{self.drain:g}s before their restart and rejoin "
                f"{self.admission_seconds:g}s after their health gate")

    def take_out(self, droplet_ids: Mapping[str, int]) -> None:
        """Out of the load balancer, then the drain; a failure means: restart nothing."""
        if not droplet_ids:
            return
        t = time.monotonic()
        self._tag("DELETE", droplet_ids)
        self.emit(None, f"out of the load balancer: {', '.join(droplet_ids)}")
        self.sleep(self.drain)
        self.add_time("lb_drain_s", time.monotonic() - t)

    def put_back(self, droplet_ids: Mapping[str, int], serving: Collection[str]) -> None:
        """The ``serving`` hosts (healthy, or rolled back) rejoin the load balancer and the
        admission is waited out; the others stay out (a failure here is reported, not raised:
        ``gpufleet cloud`` puts the tag back)."""
        if not droplet_ids:
            return
        back = {n: i for n, i in droplet_ids.items() if n in serving}
        left = sorted(set(droplet_ids) - set(back))
        t = time.monotonic()
        try:
            self._tag("POST", back)
        except GateError as e:
            self.emit(None, str(e))
        else:
            if back:
                self.emit(None, f"back in the load balancer: {', '.join(back)}")
                self.sleep(self.admission_seconds)
        if left:
            self.emit(None, f"left out of the load balancer (not serving): {', '.join(left)}")
        self.add_time("lb_admission_s", time.monotonic() - t)

    def _tag(self, method: str, droplet_ids: Mapping[str, int]) -> None:
        if not droplet_ids:
            return
        try:
            if method == "POST":
                self.client.tag_droplets(self.lb_tag, droplet_ids.values())
            else:
                self.client.untag_droplets(self.lb_tag, droplet_ids.values())
        except DigitalOceanError as e:
            verb = "add" if method == "POST" else "remove"
            raise GateError(f"cannot {verb} the tag {self.lb_tag} on "
                            f"{', '.join(sorted(droplet_ids))}: {e}") from None


def gate_for(host_data: Mapping[str, Mapping[str, Any]], drain: float,
             environ: Mapping[str, str] | None = None,
             client_factory: Callable[[str, str], DigitalOceanClient] = DigitalOceanClient,
             emit: Callable[[str | None, str], None] = lambda _host, _text: None,
             add_time: Callable[[str, float], None] = lambda _key, _seconds: None,
             ) -> LoadBalancerGate | None:
    """The gate for these hosts (name -> inventory data), or None when there is no load balancer
    to tell (not droplets, no token, or ``gpufleet cloud`` made none)."""
    if not host_data or not all("droplet_id" in d for d in host_data.values()):
        return None
    try:
        settings = settings_from_env(os.environ if environ is None else environ)
    except InventoryError:
        return None
    client = client_factory(settings.token, settings.api_url)
    try:
        found = [lb for lb in client.list_load_balancers()
                 if lb.get("name") == cloud.resource_name(settings.tag)]
    except DigitalOceanError as e:
        raise GateError(f"cannot read the load balancers: {e}") from None
    if not found:
        return None
    gate = LoadBalancerGate(client, settings.tag, found[0], drain, emit=emit, add_time=add_time)
    emit(None, gate.describe())
    return gate


@contextmanager
def out_of_service(gate: LoadBalancerGate | None, host_data: Mapping[str, Mapping[str, Any]],
                   serving: Callable[[], Collection[str]]) -> Iterator[None]:
    """Around a batch's restart: its hosts out of the load balancer, back in afterwards if
    ``serving()`` names them. Without a gate, nothing."""
    if gate is None:
        yield
        return
    ids = {n: int(d["droplet_id"]) for n, d in host_data.items()}
    gate.take_out(ids)
    try:
        yield
    finally:
        gate.put_back(ids, serving())


def membership(host_data: Mapping[str, Mapping[str, Any]],
               environ: Mapping[str, str] | None = None,
               client_factory: Callable[[str, str], DigitalOceanClient] = DigitalOceanClient,
               ) -> dict[str, str]:
    """The load balancer's view of each host for ``gpufleet status``: ``in`` (it has the load
    balancer's tag), ``out`` (a rollout took it out, or it failed), or ``?`` when the API did not
    answer; empty when there is no load balancer."""
    try:
        gate = gate_for(host_data, 0, environ, client_factory)
    except GateError:
        return dict.fromkeys(host_data, "?")
    if gate is None:
        return {}
    return {n: "in" if gate.lb_tag in (d.get("droplet_tags") or ()) else "out"
            for n, d in host_data.items()}
