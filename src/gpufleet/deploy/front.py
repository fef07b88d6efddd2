"""The front on each host (``gpufleet.model.front``): nginx and its files in place and checked
by nginx before vLLM restarts (a refused config changes nothing that serves), then, once vLLM
has moved off the public port, nginx reloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpufleet.deploy import unit_file as render
from gpufleet.model import front, names
from gpufleet.model.secrets import Secret, ServiceSecrets
from gpufleet.model.spec import ServiceSpec
from gpufleet.operations import front as nginx


def site_conf(spec: ServiceSpec) -> str:
    return render.render(
        "front.nginx.conf.j2", spec=spec, nginx_name=front.nginx_name(spec.service),
        listen=front.listen(spec), keys_file=names.front_keys_file(spec.service),
        certificate=names.tls_certificate_file(spec.service),
        certificate_key=names.tls_key_file(spec.service),
        local_networks=front.LOCAL_NETWORKS, metrics_from=front.metrics_networks(spec),
        metrics_listen=front.listen(spec, spec.metrics_port), not_found=front.NOT_FOUND_BODY,
    )


def front_files(spec: ServiceSpec, secrets: ServiceSecrets) -> dict[str, nginx.FrontFile]:
    """What the front's files hold (None: must not exist) and their modes."""
    service = spec.service
    tls = spec.tls_certificate is not None and spec.tls_key is not None
    return {
        names.front_url_file(service): (front.local_url(spec) + "\n", "644"),
        names.front_site(service): (Secret(site_conf(spec)), "644"),
        names.front_keys_file(service): (front.keys_conf(service, secrets.api_key), "600"),
        names.tls_certificate_file(service): (
            Secret(Path(spec.tls_certificate).read_text(encoding="utf-8"))
            if tls and spec.tls_certificate else None, "644"),
        names.tls_key_file(service): (
            Secret(Path(spec.tls_key).read_text(encoding="utf-8"))
            if tls and spec.tls_key else None, "600"),
    }


def configured(spec: ServiceSpec, secrets: ServiceSecrets) -> Any:
    return nginx.configured(
        name=f"Front: nginx on :{spec.port} -> vLLM on 127.0.0.1:{spec.vllm_port}"
             + (" (TLS)" if spec.tls else ""),
        files=front_files(spec, secrets), package=front.PACKAGE,
    )


def applied(config: Any) -> None:
    """After vLLM's restart (it may have held the public port)."""
    nginx.reloaded(name="nginx reloaded for the new front", _if=config.did_change)
