"""``gpufleet cloud``: the service's load balancer and cloud firewall on DigitalOcean.

``plan`` reads what is there and says what would change (nothing is written: ``--dry``);
``apply`` carries the plan out: the load balancer's tag onto every droplet of the service that
lacks it, the load balancer created or replaced (``PUT``) and waited for until it has an address,
then the firewall, whose API rule names the load balancer's id. A second run finds both by name
and changes nothing. The bodies and the comparison are ``gpufleet.model.cloud``'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gpufleet.clients.digitalocean import DigitalOceanClient, DigitalOceanError, Droplet
from gpufleet.model import cloud
from gpufleet.model.spec import ServiceSpec

Json = dict[str, Any]
LB_READY_TIMEOUT = 900.0  # DigitalOcean documents minutes for a new load balancer
LB_POLL = 5.0


class CloudError(Exception):
    """The cloud resources cannot be planned or applied; the message says what to do."""


@dataclass
class Resource:
    kind: str  # "load balancer" or "firewall"
    name: str
    current: Json | None  # the API's object, None: it does not exist
    desired: Json
    changes: list[cloud.Change]

    @property
    def action(self) -> str:
        if self.current is None:
            return "create"
        return "update" if self.changes else "unchanged"

    @property
    def id(self) -> str | None:
        return None if self.current is None else str(self.current["id"])


@dataclass
class CloudPlan:
    spec: ServiceSpec
    tag: str
    region: str
    droplets: list[Droplet]
    to_tag: list[Droplet]  # service droplets the load balancer's tag is missing on
    load_balancer: Resource
    firewall: Resource

    @property
    def changes_anything(self) -> bool:
        return bool(self.to_tag) or any(r.action != "unchanged" for r in self.resources)

    @property
    def resources(self) -> tuple[Resource, Resource]:
        return (self.load_balancer, self.firewall)


def _by_name(items: list[Json], name: str, kind: str) -> Json | None:
    found = [i for i in items if i.get("name") == name]
    if len(found) > 1:
        ids = ", ".join(str(i.get("id")) for i in found)
        raise CloudError(f"{len(found)} {kind}s are named {name} ({ids}): gpufleet finds its "
                         f"{kind} by name; delete the extra ones")
    return found[0] if found else None


def check_spec(spec: ServiceSpec) -> None:
    if not spec.ssh_from:
        raise CloudError("set ssh_from in the spec to the ranges the operators SSH from (such as "
                         "203.0.113.0/24): the firewall admits SSH from nowhere else, so without "
                         "it nobody could reach the droplets to deploy")


def plan(client: DigitalOceanClient, spec: ServiceSpec, tag: str) -> CloudPlan:
    check_spec(spec)
    droplets = client.list_droplets(tag)
    if not droplets:
        raise CloudError(f"no droplets are tagged {tag!r}: the load balancer and the firewall "
                         "follow the service's droplets; deploy them first (GPUFLEET_TAG)")
    regions = sorted({d.region for d in droplets})
    if len(regions) > 1:
        raise CloudError(f"the droplets tagged {tag!r} are in {len(regions)} regions "
                         f"({', '.join(regions)}): a DigitalOcean load balancer serves one "
                         "region; give each region its own tag")
    region, name = regions[0], cloud.resource_name(tag)
    lb_now = _by_name(client.list_load_balancers(), name, "load balancer")
    lb_want = cloud.load_balancer(spec, tag, region)
    lb = Resource("load balancer", name, lb_now, lb_want, cloud.changes(
        cloud.comparable_lb(lb_now) if lb_now else None, cloud.comparable_lb(lb_want),
        cloud.LB_FIELDS))
    fw_now = _by_name(client.list_firewalls(), name, "firewall")
    fw_want = cloud.firewall(spec, tag, lb.id or cloud.NEW_LB)
    fw = Resource("firewall", name, fw_now, fw_want, cloud.changes(
        cloud.comparable_firewall(fw_now) if fw_now else None, cloud.comparable_firewall(fw_want),
        cloud.FIREWALL_FIELDS))
    serving = cloud.lb_tag(tag)
    to_tag = [d for d in droplets if serving not in d.tags]
    return CloudPlan(spec, tag, region, droplets, to_tag, lb, fw)


def apply(client: DigitalOceanClient, the_plan: CloudPlan, *,
          emit: Callable[[str], None] = print, sleep: Callable[[float], None] = time.sleep,
          clock: Callable[[], float] = time.monotonic,
          ready_timeout: float = LB_READY_TIMEOUT) -> Json:
    """Carry the plan out; returns the load balancer as the API has it at the end."""
    serving = cloud.lb_tag(the_plan.tag)
    if the_plan.to_tag:
        client.create_tag(serving)
        client.tag_droplets(serving, [d.id for d in the_plan.to_tag])
        emit(f"tagged {serving}: {', '.join(d.name for d in the_plan.to_tag)}")
    lb = the_plan.load_balancer
    if lb.action == "create":
        made = client.create_load_balancer(lb.desired)
        emit(f"created load balancer {lb.name} ({made['id']})")
    elif lb.action == "update":
        made = client.update_load_balancer(str(lb.id), lb.desired)
        emit(f"updated load balancer {lb.name} ({lb.id})")
    else:
        made = dict(lb.current or {})
    made = wait_ready(client, made, sleep=sleep, clock=clock, timeout=ready_timeout)
    fw = the_plan.firewall
    if fw.action != "unchanged":
        body = cloud.firewall(the_plan.spec, the_plan.tag, str(made["id"]))
        if fw.action == "create":
            emit(f"created firewall {fw.name} ({client.create_firewall(body)['id']})")
        else:
            client.update_firewall(str(fw.id), body)
            emit(f"updated firewall {fw.name} ({fw.id})")
    return made


def wait_ready(client: DigitalOceanClient, lb: Json, *, sleep: Callable[[float], None],
               clock: Callable[[], float], timeout: float) -> Json:
    """Poll until the load balancer is ``active`` with an address."""
    deadline = clock() + timeout
    while not (lb.get("status") == "active" and lb.get("ip")):
        if lb.get("status") == "errored":
            raise CloudError(f"the load balancer {lb.get('name')} ({lb.get('id')}) is errored; "
                             "see the DigitalOcean control panel")
        if clock() >= deadline:
            raise CloudError(f"the load balancer {lb.get('name')} ({lb.get('id')}) is not active "
                             f"after {timeout:g} s (status {lb.get('status')}); run again later")
        sleep(LB_POLL)
        lb = client.get_load_balancer(str(lb["id"]))
    return lb


def lb_url(lb: Json) -> str:
    """The load balancer's address as clients write it, from its first forwarding rule
    (``/v1`` after it is the front's API)."""
    rules = lb.get("forwarding_rules") or [{}]
    tls = rules[0].get("entry_protocol") in ("https", "http2", "http3")
    port = int(rules[0].get("entry_port") or (443 if tls else 80))
    default = 443 if tls else 80
    return f"{'https' if tls else 'http'}://{lb.get('ip')}{'' if port == default else f':{port}'}"


def find_load_balancer(client: DigitalOceanClient, tag: str) -> Json | None:
    """The service's load balancer, or None when ``gpufleet cloud`` never made one."""
    try:
        return _by_name(client.list_load_balancers(), cloud.resource_name(tag), "load balancer")
    except DigitalOceanError as e:
        raise CloudError(str(e)) from None


def render_plan(the_plan: CloudPlan) -> str:
    lines = [f"service tag {the_plan.tag}: {len(the_plan.droplets)} droplets in "
             f"{the_plan.region}"]
    if the_plan.to_tag:
        lines.append(f"+ tag {cloud.lb_tag(the_plan.tag)} on "
                     f"{', '.join(d.name for d in the_plan.to_tag)}")
    for r in the_plan.resources:
        mark = {"create": "+", "update": "~", "unchanged": "="}[r.action]
        where = f" ({r.id})" if r.id else ""
        lines.append(f"{mark} {r.kind} {r.name}{where}: {r.action}")
        lines += [f"    {c.describe()}" for c in r.changes]
    return "\n".join(lines) + "\n"
