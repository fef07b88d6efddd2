"""The front on each host (``gpufleet.model.front``): nginx installed early, its key check and
site written and checked by nginx before vLLM restarts (a refused config changes nothing that
serves), then, once vLLM has moved off the public port, nginx reloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pyinfra.operations import files, systemd
from pyinfra.operations.util import any_changed

from gpufleet.deploy import unit_file as render
from gpufleet.model import front, names
from gpufleet.model.secrets import Secret, ServiceSecrets
from gpufleet.model.spec import ServiceSpec
from gpufleet.operations import front as nginx
from gpufleet.operations import vllm

DEBIAN_DEFAULT_SITE = "/etc/nginx/sites-enabled/default"


def site_conf(spec: ServiceSpec) -> str:
    return render.render(
        "front.nginx.conf.j2", spec=spec, nginx_name=front.nginx_name(spec.service),
        listen=front.listen(spec), keys_file=names.front_keys_file(spec.service),
        certificate=names.tls_certificate_file(spec.service),
        certificate_key=names.tls_key_file(spec.service),
        metrics_from=front.metrics_networks(spec),
        not_found=front.NOT_FOUND_BODY,
    )


def secret_paths(spec: ServiceSpec) -> list[str]:
    """The service's secret files, read with one fact command (``vllm.secret_file``)."""
    return list(names.secret_files(spec.service))


def installed() -> None:
    nginx.nginx_installed(name="nginx (the front)", package=front.PACKAGE)
    # Debian's welcome page on port 80 (a symlink; sites-available/default stays)
    files.link(name="nginx: Debian's default site disabled", path=DEBIAN_DEFAULT_SITE,
               present=False)


def configured(spec: ServiceSpec, secrets: ServiceSecrets) -> list[Any]:
    """The key check, TLS files and site in place (nginx still runs its old config)."""
    service = spec.service
    changes = [vllm.secret_file(
        name=f"Front key check {names.front_keys_file(service)} (0600)",
        path=names.front_keys_file(service), content=front.keys_conf(service, secrets.api_key),
        read_with=secret_paths(spec),
    )]
    certificate, key = names.tls_certificate_file(service), names.tls_key_file(service)
    if spec.tls_certificate and spec.tls_key:
        changes.append(files.put(name=f"TLS certificate {certificate}",
                                 src=spec.tls_certificate, dest=certificate,
                                 user="root", group="root", mode="644"))
        changes.append(vllm.secret_file(
            name=f"TLS key {key} (0600)", path=key,
            content=Secret(Path(spec.tls_key).read_text(encoding="utf-8")),
            read_with=secret_paths(spec)))
    else:
        changes.append(vllm.secret_file(name=f"No TLS key {key} (plain HTTP)", path=key,
                                        content=None, present=False,
                                        read_with=secret_paths(spec)))
        changes.append(files.file(name=f"No TLS certificate {certificate}", path=certificate,
                                  present=False))
    # before the site: a new key or certificate must load too (checked with the site, or here)
    site = nginx.site(
        name=f"Front {names.front_site(service)} (:{spec.port} -> 127.0.0.1:{spec.vllm_port})",
        path=names.front_site(service), content=site_conf(spec),
    )
    nginx.config_checked(name="nginx -t: the front's key and certificate load",
                         _if=lambda: any_changed(*changes)() and not site.did_change())
    return [*changes, site]


def applied(changes: list[Any]) -> None:
    """After vLLM's restart (it may have held the public port): start, reload."""
    changed = any_changed(*changes)
    systemd.service(name="nginx enabled and running", service="nginx", running=True,
                    enabled=True)
    systemd.service(name="nginx reloaded for the new front", service="nginx", reloaded=True,
                    _if=changed)
