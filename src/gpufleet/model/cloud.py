"""The service's DigitalOcean cloud firewall and load balancer, as the API's JSON (pure, no I/O).

Both are named ``gpufleet-<tag>`` and found by that name, so a second ``gpufleet cloud`` finds
what the first made and changes only what differs (``changes``).

* The **load balancer** sends to the droplets tagged ``<tag>-lb`` (``lb_tag``), not to the
  service's own tag: the rollout takes a host out of it by removing that tag while the host stays
  in the inventory (which lists the service's tag). Health checks ask the front's ``/health``.
* The **firewall** applies to the service's tag: SSH from ``ssh_from``, the front's port from the
  load balancer and ``api_from``, the front's metrics port from ``metrics_from``, the weight
  peers' port from the service's own droplets, nothing else in. DigitalOcean drops outbound traffic a firewall does not allow, so
  it allows all of it (apt, the image registry, the Hub).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gpufleet.model import names
from gpufleet.model.spec import ServiceSpec

Json = dict[str, Any]
EVERYWHERE = ["0.0.0.0/0", "::/0"]
NEW_LB = "(the new load balancer)"  # the firewall's LB source before the LB has an id


def resource_name(tag: str) -> str:
    return f"gpufleet-{tag}"


def lb_tag(tag: str) -> str:
    """The tag the load balancer follows: the service's droplets that may get requests."""
    return f"{tag}-lb"


def lb_port(spec: ServiceSpec) -> int:
    return spec.lb_port or (443 if spec.tls else 80)


def load_balancer(spec: ServiceSpec, tag: str, region: str) -> Json:
    """The body of ``POST``/``PUT /v2/load_balancers`` for the service."""
    if spec.tls:  # the front holds the certificate: the load balancer passes TLS through
        rule = {"entry_protocol": "https", "entry_port": lb_port(spec),
                "target_protocol": "https", "target_port": spec.port, "tls_passthrough": True}
        check_protocol = "https"
    else:
        rule = {"entry_protocol": "http", "entry_port": lb_port(spec),
                "target_protocol": "http", "target_port": spec.port, "tls_passthrough": False}
        check_protocol = "http"
    return {
        "name": resource_name(tag),
        "region": region,
        "tag": lb_tag(tag),
        "forwarding_rules": [rule],
        "health_check": {
            "protocol": check_protocol, "port": spec.port, "path": "/health",
            "check_interval_seconds": spec.lb_check_interval,
            "response_timeout_seconds": spec.lb_response_timeout,
            "healthy_threshold": spec.lb_healthy_threshold,
            "unhealthy_threshold": spec.lb_unhealthy_threshold,
        },
        "http_idle_timeout_seconds": spec.lb_idle_timeout,
        "redirect_http_to_https": False,
    }


def firewall(spec: ServiceSpec, tag: str, lb_id: str) -> Json:
    """The body of ``POST``/``PUT /v2/firewalls`` for the service."""
    api_sources: Json = {"load_balancer_uids": [lb_id]}
    if spec.api_from:
        api_sources["addresses"] = _unique(spec.api_from)
    metrics = ([{"protocol": "tcp", "ports": str(spec.metrics_port),
                 "sources": {"addresses": _unique(spec.metrics_from)}}]
               if spec.metrics_from else [])
    outbound = [{"protocol": p, "ports": "all" if p != "icmp" else "",
                 "destinations": {"addresses": list(EVERYWHERE)}} for p in ("tcp", "udp", "icmp")]
    for rule in outbound:
        if rule["protocol"] == "icmp":
            del rule["ports"]
    return {
        "name": resource_name(tag),
        "tags": [tag],
        "droplet_ids": [],
        "inbound_rules": [
            {"protocol": "tcp", "ports": "22", "sources": {"addresses": list(spec.ssh_from)}},
            {"protocol": "tcp", "ports": str(spec.port), "sources": api_sources},
            {"protocol": "tcp", "ports": str(names.WEIGHT_PEER_PORT), "sources": {"tags": [tag]}},
            *metrics,
        ],
        "outbound_rules": outbound,
    }


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


# -- comparing what is there with what should be ------------------------------------------------

LB_FIELDS = ("name", "region", "tag", "forwarding_rules", "health_check",
             "http_idle_timeout_seconds", "redirect_http_to_https")
FIREWALL_FIELDS = ("name", "tags", "droplet_ids", "inbound_rules", "outbound_rules")
_RULE_KEYS = ("entry_protocol", "entry_port", "target_protocol", "target_port", "tls_passthrough")
_PEERS = ("addresses", "droplet_ids", "load_balancer_uids", "kubernetes_ids", "tags")


def comparable_lb(data: Mapping[str, Any]) -> Json:
    """The load balancer's fields gpufleet manages, in the form ``load_balancer`` builds
    (the API's answer names the region as an object and adds fields of its own)."""
    region = data.get("region")
    return {
        "name": data.get("name"),
        "region": region.get("slug") if isinstance(region, Mapping) else region,
        "tag": data.get("tag") or "",
        "forwarding_rules": [{k: r.get(k, False if k == "tls_passthrough" else None)
                              for k in _RULE_KEYS} for r in data.get("forwarding_rules") or ()],
        "health_check": {k: (data.get("health_check") or {}).get(k)
                         for k in load_balancer_health_keys()},
        "http_idle_timeout_seconds": data.get("http_idle_timeout_seconds"),
        "redirect_http_to_https": bool(data.get("redirect_http_to_https")),
    }


def load_balancer_health_keys() -> tuple[str, ...]:
    return ("protocol", "port", "path", "check_interval_seconds", "response_timeout_seconds",
            "healthy_threshold", "unhealthy_threshold")


def comparable_firewall(data: Mapping[str, Any]) -> Json:
    """The firewall's managed fields with its rules in one order and empty peers left out."""
    def rules(key: str, peers: str) -> list[Json]:
        out = []
        for rule in data.get(key) or ():
            protocol = rule.get("protocol")
            ports = "" if protocol == "icmp" else str(rule.get("ports") or "")
            if ports == "0":
                ports = "all"  # the API answers "0" for all ports
            where = {k: sorted(str(v) for v in (rule.get(peers) or {}).get(k) or ())
                     for k in _PEERS}
            out.append({"protocol": protocol, **({"ports": ports} if ports else {}),
                        peers: {k: v for k, v in where.items() if v}})
        return sorted(out, key=lambda r: (r["protocol"], r.get("ports", ""), str(r[peers])))

    return {
        "name": data.get("name"),
        "tags": sorted(data.get("tags") or ()),
        "droplet_ids": sorted(int(i) for i in data.get("droplet_ids") or ()),
        "inbound_rules": rules("inbound_rules", "sources"),
        "outbound_rules": rules("outbound_rules", "destinations"),
    }


@dataclass(frozen=True)
class Change:
    """One field that differs: ``before`` None when the resource does not exist yet."""

    field: str
    before: Any
    after: Any

    def describe(self) -> str:
        if self.before is None:
            return f"{self.field}: {_show(self.after)}"
        return f"{self.field}: {_show(self.before)} -> {_show(self.after)}"


def changes(current: Mapping[str, Any] | None, desired: Mapping[str, Any],
            fields: Sequence[str]) -> list[Change]:
    """What must change for ``current`` (comparable form, or None: missing) to be ``desired``
    (comparable form), field by field, nested objects and rules line by line."""
    out: list[Change] = []
    for name in fields:
        before = None if current is None else current.get(name)
        after = desired.get(name)
        if before == after:
            continue
        if isinstance(after, Mapping) and isinstance(before, Mapping):
            out += [Change(f"{name}.{k}", before.get(k), after.get(k))
                    for k in after if before.get(k) != after.get(k)]
        elif isinstance(after, list) and isinstance(before, list) and current is not None:
            gone = [r for r in before if r not in after]
            new = [r for r in after if r not in before]
            out += [Change(f"{name}[-]", r, "(removed)") for r in gone]
            out += [Change(f"{name}[+]", None, r) for r in new]
            if not gone and not new:  # the same rules in another order
                out.append(Change(name, before, after))
        else:
            out.append(Change(name, before, after))
    return out


def _show(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
