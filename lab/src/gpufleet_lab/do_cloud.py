"""Lab stand-in: request validation and JSON objects of DigitalOcean's tags, cloud firewalls and
load balancers APIs (OpenAPI spec ``digitalocean/openapi``: ``specification/resources/tags``,
``firewalls``, ``load_balancers``), for ``do_emulator``. Pure functions; a request DigitalOcean
would refuse raises ``CloudError`` (the emulator answers 422 ``unprocessable_entity``, or 404
``not_found`` for a droplet or load balancer that does not exist).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any

from gpufleet_lab import cloudnet

TAG_NAME = re.compile(r"^[A-Za-z0-9_:\-]{1,255}$")
FIREWALL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-]{0,254}$")
LB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-]{0,254}$")
RULE_ENDS = ("addresses", "droplet_ids", "load_balancer_uids", "kubernetes_ids", "tags")
FW_PROTOCOLS = ("tcp", "udp", "icmp")
LB_ENTRY_PROTOCOLS = ("http", "https", "http2", "tcp")
LB_TARGET_PROTOCOLS = ("http", "https", "http2", "tcp")
HC_PROTOCOLS = ("http", "https", "tcp")
VPC_UUID = "5a4981aa-9653-4bd1-bef5-d6bff52042e4"  # the droplets' (do_emulator.droplet_json)
HEALTH_DEFAULTS: dict[str, Any] = {
    "protocol": "http",
    "port": 80,
    "path": "/",
    "check_interval_seconds": 10,
    "response_timeout_seconds": 5,
    "healthy_threshold": 3,
    "unhealthy_threshold": 5,
}
HEALTH_RANGES = {
    "check_interval_seconds": (3, 300),
    "response_timeout_seconds": (3, 300),
    "healthy_threshold": (2, 10),
    "unhealthy_threshold": (2, 10),
}


class CloudError(Exception):
    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


Exists = Callable[[int], bool]


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise CloudError(f"{what} must be an integer between {lo} and {hi}.")
    return value


def _list(body: Mapping[str, Any], key: str, what: str) -> list[Any]:
    value = body.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise CloudError(f"{what}{key} must be an array.")
    return value


def check_tag_name(name: Any) -> str:
    if not isinstance(name, str) or not TAG_NAME.match(name):
        raise CloudError(
            "tag name must be 1-255 letters, numbers, colons, dashes and underscores."
        )
    return name


def tag_json(name: str, droplet_count: int, last_uri: str = "") -> dict[str, Any]:
    """``{"tag": ...}``'s object: its name and what carries it (the lab has only droplets)."""
    empty = {"count": 0, "last_tagged_uri": ""}
    return {
        "name": name,
        "resources": {
            "count": droplet_count,
            "last_tagged_uri": last_uri,
            "droplets": {"count": droplet_count, "last_tagged_uri": last_uri},
            "images": dict(empty),
            "volumes": dict(empty),
            "volume_snapshots": dict(empty),
            "databases": dict(empty),
        },
    }


def tag_resources(body: Mapping[str, Any], exists: Exists) -> list[int]:
    """The droplet ids of a ``/v2/tags/{tag}/resources`` body."""
    resources = _list(body, "resources", "")
    if not resources:
        raise CloudError("resources must be a non-empty array.")
    ids: list[int] = []
    for res in resources:
        if not isinstance(res, Mapping):
            raise CloudError("each resource must be an object.")
        rid, kind = res.get("resource_id"), res.get("resource_type")
        if kind not in ("droplet", "image", "volume", "volume_snapshot", "database"):
            raise CloudError(f"resource_type {kind!r} is not valid.")
        if kind != "droplet" or not str(rid).isdigit() or not exists(int(str(rid))):
            raise CloudError(f"{kind} {rid} could not be found.", 404)  # the lab has no others
        ids.append(int(str(rid)))
    return ids


# --------------------------------------------------------------------------------------------
# Firewalls
# --------------------------------------------------------------------------------------------


def _ports(protocol: str, ports: Any, where: str) -> str:
    if protocol == "icmp":
        if ports not in (None, "", "0"):
            raise CloudError(f"{where}: icmp rules take no ports.")
        return "0"
    if not isinstance(ports, str):
        raise CloudError(f"{where}: ports is required for {protocol} rules.")
    if ports in ("all", "0"):
        return ports
    m = re.fullmatch(r"(\d{1,5})(?:-(\d{1,5}))?", ports)
    if m is None:
        raise CloudError(f"{where}: ports must be a port, a range like 8000-8010, or all.")
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    if not 1 <= lo <= hi <= 65535:
        raise CloudError(f"{where}: ports {ports!r} is not a valid port range.")
    return ports


def _ends(value: Any, where: str, exists: Exists, lb_exists: Callable[[str], bool],
          ) -> dict[str, list[Any]]:
    if not isinstance(value, Mapping):
        raise CloudError(f"{where} must be an object.")
    unknown = sorted(set(value) - set(RULE_ENDS))
    if unknown:
        raise CloudError(f"{where}: unknown key {unknown[0]!r}.")
    ends = {k: _list(value, k, f"{where}.") for k in RULE_ENDS if k in value}
    if not any(ends.values()):
        raise CloudError(f"{where} must name at least one address, droplet, load balancer, "
                         f"Kubernetes cluster or tag.")
    for address in ends.get("addresses", []):
        try:
            ipaddress.ip_network(str(address), strict=False)
        except ValueError:
            raise CloudError(f"{where}: {address!r} is not an IP address or CIDR.") from None
    for tag in ends.get("tags", []):
        check_tag_name(tag)
    for i in ends.get("droplet_ids", []):
        if isinstance(i, bool) or not isinstance(i, int) or not exists(i):
            raise CloudError(f"{where}: droplet {i} could not be found.", 404)
    for uid in ends.get("load_balancer_uids", []):
        if not lb_exists(str(uid)):
            raise CloudError(f"{where}: load balancer {uid} could not be found.", 404)
    return ends


def _fw_rules(body: Mapping[str, Any], key: str, ends_key: str, exists: Exists,
              lb_exists: Callable[[str], bool]) -> list[dict[str, Any]]:
    rules = []
    for n, rule in enumerate(_list(body, key, "")):
        where = f"{key}[{n}]"
        if not isinstance(rule, Mapping):
            raise CloudError(f"{where} must be an object.")
        protocol = rule.get("protocol")
        if protocol not in FW_PROTOCOLS:
            raise CloudError(f"{where}: protocol must be one of tcp, udp, icmp.")
        rules.append({
            "protocol": protocol,
            "ports": _ports(protocol, rule.get("ports"), where),
            ends_key: _ends(rule.get(ends_key), f"{where}.{ends_key}", exists, lb_exists),
        })
    return rules


def firewall_fields(body: Mapping[str, Any], exists: Exists,
                    lb_exists: Callable[[str], bool]) -> dict[str, Any]:
    """The client-set fields of a firewall (a create or a full-replacement update)."""
    name = body.get("name")
    if not isinstance(name, str) or not FIREWALL_NAME.match(name):
        raise CloudError("name is required: it must begin with a letter or digit, then letters, "
                         "digits, periods or dashes.")
    droplet_ids = _list(body, "droplet_ids", "")
    for i in droplet_ids:
        if isinstance(i, bool) or not isinstance(i, int) or not exists(i):
            raise CloudError(f"droplet {i} could not be found.", 404)
    tags = [check_tag_name(t) for t in _list(body, "tags", "")]
    return {
        "name": name,
        "inbound_rules": _fw_rules(body, "inbound_rules", "sources", exists, lb_exists),
        "outbound_rules": _fw_rules(body, "outbound_rules", "destinations", exists, lb_exists),
        "droplet_ids": list(dict.fromkeys(droplet_ids)),
        "tags": list(dict.fromkeys(tags)),
    }


# --------------------------------------------------------------------------------------------
# Load balancers
# --------------------------------------------------------------------------------------------


def _forwarding_rule(rule: Any, n: int) -> dict[str, Any]:
    where = f"forwarding_rules[{n}]"
    if not isinstance(rule, Mapping):
        raise CloudError(f"{where} must be an object.")
    entry, target = rule.get("entry_protocol"), rule.get("target_protocol")
    if entry not in LB_ENTRY_PROTOCOLS:
        raise CloudError(f"{where}: entry_protocol must be one of "
                         f"{', '.join(LB_ENTRY_PROTOCOLS)} (the lab has no http3 or udp).")
    if target not in LB_TARGET_PROTOCOLS:
        raise CloudError(f"{where}: target_protocol must be one of "
                         f"{', '.join(LB_TARGET_PROTOCOLS)}.")
    passthrough = rule.get("tls_passthrough", False)
    if not isinstance(passthrough, bool):
        raise CloudError(f"{where}: tls_passthrough must be a boolean.")
    certificate = rule.get("certificate_id") or ""
    if passthrough and (entry != "https" or target != "https"):
        raise CloudError(f"{where}: tls_passthrough needs https on both sides.")
    if entry in ("https", "http2") and not passthrough:
        # a certificate_id would name a certificate of /v2/certificates, which the lab has not
        raise CloudError(f"{where}: certificate {certificate!r} could not be found (the lab "
                         f"has no certificates: use tls_passthrough or tcp).", 404 if
                         certificate else 422)
    if (entry == "tcp") != (target == "tcp"):
        raise CloudError(f"{where}: tcp forwards to tcp only.")
    return {
        "entry_protocol": entry,
        "entry_port": _int(rule.get("entry_port"), f"{where}: entry_port", 1, 65535),
        "target_protocol": target,
        "target_port": _int(rule.get("target_port"), f"{where}: target_port", 1, 65535),
        "certificate_id": certificate,
        "tls_passthrough": passthrough,
    }


def _health_check(value: Any) -> dict[str, Any]:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise CloudError("health_check must be an object.")
    hc = {**HEALTH_DEFAULTS, **{k: v for k, v in value.items() if k in HEALTH_DEFAULTS}}
    if hc["protocol"] not in HC_PROTOCOLS:
        raise CloudError("health_check.protocol must be one of http, https, tcp.")
    hc["port"] = _int(hc["port"], "health_check.port", 1, 65535)
    if not isinstance(hc["path"], str) or (hc["protocol"] != "tcp" and
                                           not hc["path"].startswith("/")):
        raise CloudError("health_check.path must be a path starting with /.")
    for key, (lo, hi) in HEALTH_RANGES.items():
        hc[key] = _int(hc[key], f"health_check.{key}", lo, hi)
    return hc


def _bool(body: Mapping[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise CloudError(f"{key} must be a boolean.")
    return value


def load_balancer_fields(body: Mapping[str, Any], exists: Exists,
                         regions: Mapping[str, str]) -> dict[str, Any]:
    """The client-set fields of a load balancer (a create or a full-replacement update)."""
    name = body.get("name")
    if not isinstance(name, str) or not LB_NAME.match(name):
        raise CloudError("name is required: it must begin with a letter or digit, then letters, "
                         "digits, periods or dashes.")
    region = body.get("region")
    if region not in regions:
        raise CloudError(f"region must be one of {', '.join(sorted(regions))}.")
    rules = _list(body, "forwarding_rules", "")
    if not rules:
        raise CloudError("forwarding_rules must have at least one rule.")
    forwarding = [_forwarding_rule(r, n) for n, r in enumerate(rules)]
    ports = [r["entry_port"] for r in forwarding]
    if len(set(ports)) != len(ports):
        raise CloudError("forwarding_rules: each entry_port may be used once.")
    tag, droplet_ids = body.get("tag") or "", _list(body, "droplet_ids", "")
    if bool(tag) == bool(droplet_ids):
        raise CloudError("exactly one of tag or droplet_ids must be given.")
    if tag:
        check_tag_name(tag)
    for i in droplet_ids:
        if isinstance(i, bool) or not isinstance(i, int) or not exists(i):
            raise CloudError(f"droplet {i} could not be found.", 404)
    idle = body.get("http_idle_timeout_seconds", 60)
    sticky = body.get("sticky_sessions") or {"type": "none"}
    if not isinstance(sticky, Mapping) or sticky.get("type") != "none":
        raise CloudError("sticky_sessions: the lab supports type none only.")
    network = body.get("network", "EXTERNAL")
    if network not in ("EXTERNAL", "INTERNAL"):
        raise CloudError("network must be EXTERNAL or INTERNAL.")
    return {
        "name": name,
        "region": region,
        "size_unit": _int(body.get("size_unit", 1), "size_unit", 1, 100),
        "forwarding_rules": forwarding,
        "health_check": _health_check(body.get("health_check")),
        "sticky_sessions": {"type": "none"},
        "redirect_http_to_https": _bool(body, "redirect_http_to_https"),
        "enable_proxy_protocol": _bool(body, "enable_proxy_protocol"),
        "enable_backend_keepalive": _bool(body, "enable_backend_keepalive"),
        "http_idle_timeout_seconds": _int(idle, "http_idle_timeout_seconds", 30, 600),
        "tag": tag,
        "droplet_ids": list(dict.fromkeys(droplet_ids)),
        "vpc_uuid": str(body.get("vpc_uuid") or VPC_UUID),
        "network": network,
    }


def lb_spec(lb: Mapping[str, Any], slot: int, addresses: tuple[str, str],
            members: list[cloudnet.Member]) -> cloudnet.LbSpec:
    """The network plan of one stored load balancer."""
    hc = lb["health_check"]
    return cloudnet.LbSpec(
        id=str(lb["id"]),
        slot=slot,
        public_ip=addresses[0],
        private_ip=addresses[1],
        forwarding_rules=tuple(
            cloudnet.ForwardingRule(r["entry_protocol"], r["entry_port"], r["target_protocol"],
                                    r["target_port"], r["tls_passthrough"])
            for r in lb["forwarding_rules"]
        ),
        health_check=cloudnet.HealthCheck(**{k: hc[k] for k in HEALTH_DEFAULTS}),
        idle_timeout=int(lb["http_idle_timeout_seconds"]),
        proxy_protocol=bool(lb["enable_proxy_protocol"]),
        members=tuple(members),
    )
