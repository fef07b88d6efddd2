"""The front of a service on each host: nginx on the service's port, the one way in.

vLLM's ``--api-key`` guards only some prefixes (``/v1``, ``/v2``, ``/inference``, ``/cohere`` in
0.32); ``/invocations`` runs a full completion without a key, and ``/tokenize``, ``/metrics``,
``/version`` answer anyone (docs/evidence/real-vllm-routes.md). So vLLM is published on
127.0.0.1 only (``ServiceSpec.publish``) and nginx lets an allow-list through, so whatever a
future vLLM adds stays closed:

    /v1/...    with the bearer key (nginx compares it; vLLM checks it again)
    /health    GET and HEAD, no key: for load balancers
    /metrics   from the host itself; the spec's ``metrics_from`` networks read it on a listener
               of its own, ``metrics_port`` (a DigitalOcean load balancer reaches ``port`` from
               its VPC address: an allow-list of VPC networks there would admit every client)
    anything else: 404

The key lives in a root-only file the site includes, which only nginx's master process (root)
reads; the site file holds no secret. Pure builders: ``gpufleet.deploy.front`` renders the site and writes both.
"""

from __future__ import annotations

import ipaddress

from gpufleet.model.secrets import Secret
from gpufleet.model.spec import ServiceSpec

PACKAGE = "nginx"  # Debian's and Ubuntu's, from the distribution
ALLOWED_ROUTES = ("/v1/ (with the key)", "/health", "/metrics (the host; metrics_port: "
                  "metrics_from)")
LOCAL_NETWORKS = ("127.0.0.1", "::1")
# vLLM's own answers, so a client sees the same body whichever refuses it
UNAUTHORIZED_BODY = '{"error": "Unauthorized"}'
NOT_FOUND_BODY = '{"detail": "Not Found"}'


def nginx_name(service: str) -> str:
    """The service's name as nginx variables and upstreams take it (no '-')."""
    return "gpufleet_" + service.replace("-", "_")


def keys_conf(service: str, api_key: Secret) -> Secret:
    """The root-only key check the site includes first in ``location /v1/``: anything but the
    one right header answers 401. (An nginx ``map`` would need ``map_hash_bucket_size`` raised
    for a key this long, a setting of the whole ``http`` block.) The key is a bearer token
    (``gpufleet.model.secrets.api_key`` allows no quote, space, ';' or '$')."""
    key = api_key.reveal()
    return Secret(f"# Managed by gpufleet: the {service} front's API key check (root-only).\n"
                  f"if ($http_authorization != \"Bearer {key}\") {{\n"
                  f"    return 401 '{UNAUTHORIZED_BODY}';\n"
                  f"}}\n")


def listen(spec: ServiceSpec, port: int | None = None) -> str:
    """nginx's ``listen`` address (on ``port``, default the service's): IPv6 in brackets; ``::``
    takes IPv4 too, like docker's."""
    port = spec.port if port is None else port
    if spec.bind_address == "::":
        return f"[::]:{port} ipv6only=off"
    if ":" in spec.bind_address:
        return f"[{spec.bind_address}]:{port}"
    return f"{spec.bind_address}:{port}"


def local_url(spec: ServiceSpec) -> str:
    """Where the host's own checks reach the front (the route clients take)."""
    scheme = "https" if spec.tls else "http"
    address = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(spec.bind_address, spec.bind_address)
    if ":" in address and not address.startswith("["):
        address = f"[{address}]"
    return f"{scheme}://{address}:{spec.port}"


def metrics_networks(spec: ServiceSpec) -> list[str]:
    """Who reads ``metrics_port``: the host itself, then the spec's networks (canonical:
    10.0.0.5/20 is 10.0.0.0/20). Empty when the spec names none: no such listener."""
    if not spec.metrics_from:
        return []
    spec_networks = [str(ipaddress.ip_network(n, strict=False)) for n in spec.metrics_from]
    return list(dict.fromkeys([*LOCAL_NETWORKS, *spec_networks]))
