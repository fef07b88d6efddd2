"""The DigitalOcean inventory: droplets tagged for a service, as pyinfra groups.

``inventories/do.py`` calls ``load_do_inventory()``. Environment:

=============================  ====================================  =========================
variable                       meaning                               default
=============================  ====================================  =========================
``DIGITALOCEAN_TOKEN``         API token (else                       required
                               ``DIGITALOCEAN_ACCESS_TOKEN``)
``DIGITALOCEAN_API_URL``       API base URL (the lab's emulator)     https://api.digitalocean.com
``GPUFLEET_TAG``               droplet tag of the service            ``llama3``
``GPUFLEET_ADDRESS``           ``public`` or ``private`` IPv4        ``public``
``GPUFLEET_SSH_USER``          SSH user                              ``root``
``GPUFLEET_SSH_KEY``           private key file                      (agent / default keys)
``GPUFLEET_KNOWN_HOSTS``       project-managed known_hosts file      ~/.config/gpufleet/known_hosts
``GPUFLEET_STRICT_HOST_KEYS``  ``accept-new``, ``yes``, ``no``,      ``accept-new``
                               ``off`` or ``ask``
=============================  ====================================  =========================

Each host's data holds its droplet id, region, size and tags, and its private (VPC) address as
``private_ip`` (where hosts hand each other the staged weights). Each failure is one
``InventoryError`` (a ``PyinfraError``, so pyinfra's CLI prints one line
and exits 1 instead of a traceback). The token is never part of any message.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyinfra.api.exceptions import PyinfraError

from gpufleet.clients.digitalocean import (
    DEFAULT_API_URL,
    DigitalOceanClient,
    DigitalOceanError,
    Droplet,
)

DEFAULT_TAG = "llama3"
DEFAULT_ADDRESS = "public"
DEFAULT_SSH_USER = "root"
DEFAULT_KNOWN_HOSTS = "~/.config/gpufleet/known_hosts"
DEFAULT_STRICT_HOST_KEYS = "accept-new"
SSH_CONNECT_RETRIES = 2
GPU_GROUP = "gpu"

ADDRESS_KINDS = ("public", "private")
STRICT_HOST_KEY_VALUES = ("accept-new", "yes", "no", "off", "ask")
# DigitalOcean tag names: letters, numbers, colons, dashes and underscores, up to 255.
_TAG_RE = re.compile(r"^[A-Za-z0-9:_\-]{1,255}$")

HostData = dict[str, Any]
Host = tuple[str, HostData]
Groups = dict[str, tuple[list[Host], dict[str, Any]]]


class InventoryError(PyinfraError):
    """The DigitalOcean inventory cannot be built; the message says why and what to do."""


@dataclass(frozen=True)
class InventorySettings:
    token: str
    api_url: str
    tag: str
    address: str
    ssh_user: str
    ssh_key: str | None
    known_hosts: str
    strict_host_keys: str

    def __repr__(self) -> str:  # never show the token
        fields = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items() if k != "token")
        return f"InventorySettings({fields})"


def _env(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name, "").strip()
    return value or None


def settings_from_env(environ: Mapping[str, str]) -> InventorySettings:
    """Read and validate the environment (pure: no network, no files written)."""
    token = _env(environ, "DIGITALOCEAN_TOKEN") or _env(environ, "DIGITALOCEAN_ACCESS_TOKEN")
    if not token:
        raise InventoryError(
            "set DIGITALOCEAN_TOKEN (or DIGITALOCEAN_ACCESS_TOKEN) to a DigitalOcean API token "
            "with droplet read access; the inventory lists droplets by tag from the API"
        )
    tag = _env(environ, "GPUFLEET_TAG") or DEFAULT_TAG
    if not _TAG_RE.match(tag):
        raise InventoryError(
            f"GPUFLEET_TAG={tag!r} is not a DigitalOcean tag name "
            "(letters, digits, ':', '-' and '_', at most 255)"
        )
    address = (_env(environ, "GPUFLEET_ADDRESS") or DEFAULT_ADDRESS).lower()
    if address not in ADDRESS_KINDS:
        raise InventoryError(f"GPUFLEET_ADDRESS must be 'public' or 'private', not {address!r}")
    strict = (_env(environ, "GPUFLEET_STRICT_HOST_KEYS") or DEFAULT_STRICT_HOST_KEYS).lower()
    if strict not in STRICT_HOST_KEY_VALUES:
        raise InventoryError(
            f"GPUFLEET_STRICT_HOST_KEYS must be one of {', '.join(STRICT_HOST_KEY_VALUES)}, "
            f"not {strict!r}"
        )
    ssh_key = _env(environ, "GPUFLEET_SSH_KEY")
    if ssh_key is not None:
        ssh_key = os.path.abspath(os.path.expanduser(ssh_key))
        if not os.path.isfile(ssh_key):
            raise InventoryError(f"GPUFLEET_SSH_KEY={ssh_key} is not a file")
    known_hosts = os.path.abspath(
        os.path.expanduser(_env(environ, "GPUFLEET_KNOWN_HOSTS") or DEFAULT_KNOWN_HOSTS)
    )
    return InventorySettings(
        token=token,
        api_url=(_env(environ, "DIGITALOCEAN_API_URL") or DEFAULT_API_URL).rstrip("/"),
        tag=tag,
        address=address,
        ssh_user=_env(environ, "GPUFLEET_SSH_USER") or DEFAULT_SSH_USER,
        ssh_key=ssh_key,
        known_hosts=known_hosts,
        strict_host_keys=strict,
    )


def group_name(tag: str) -> str:
    """A pyinfra group name for a tag: non-identifier characters become ``_``
    (``env:prod`` -> ``env_prod``); never private (``_``), never ``all``, never a digit first."""
    name = re.sub(r"\W", "_", tag, flags=re.ASCII)
    if not name or name[0].isdigit() or name.startswith("_") or name == "all":
        name = f"tag_{name}"
    return name


def host_data(droplet: Droplet, settings: InventorySettings) -> HostData:
    address = droplet.address(settings.address)
    if address is None:  # build_groups checks first; this guards direct callers
        raise InventoryError(f"droplet {droplet.name!r} has no {settings.address} IPv4 address")
    data: HostData = {
        "ssh_hostname": address,
        "ssh_user": settings.ssh_user,
        "ssh_known_hosts_file": settings.known_hosts,
        "ssh_strict_host_key_checking": settings.strict_host_keys,
        "ssh_connect_retries": SSH_CONNECT_RETRIES,
        "droplet_id": droplet.id,
        "region": droplet.region,
        "size": droplet.size,
        "droplet_tags": list(droplet.tags),
    }
    if droplet.private_ipv4:
        data["private_ip"] = droplet.private_ipv4  # the VPC address: peers share weights on it
    if settings.ssh_key:
        data["ssh_key"] = settings.ssh_key
    return data


def build_groups(droplets: Sequence[Droplet], settings: InventorySettings) -> Groups:
    """pyinfra groups for the droplets (pure): ``{<tag group>: (hosts, {}), "gpu": (hosts, {})}``
    with hosts ``(droplet name, data)`` sorted by name."""
    if not droplets:
        raise InventoryError(
            f"no droplets tagged {settings.tag!r} at {settings.api_url}: tag the service's "
            f"droplets with {settings.tag!r} or set GPUFLEET_TAG; pyinfra would otherwise run "
            "on no hosts and exit 0"
        )
    by_name: dict[str, list[Droplet]] = {}
    for droplet in droplets:
        by_name.setdefault(droplet.name, []).append(droplet)
    duplicates = {n: ds for n, ds in by_name.items() if len(ds) > 1}
    if duplicates:
        desc = "; ".join(
            f"{name!r} (ids {', '.join(str(d.id) for d in ds)})"
            for name, ds in sorted(duplicates.items())
        )
        raise InventoryError(
            f"droplet names must be unique (they are the pyinfra host names): {desc}; "
            "rename the droplets"
        )
    missing = sorted(d.name for d in droplets if d.address(settings.address) is None)
    if missing:
        other = "public" if settings.address == "private" else "private"
        raise InventoryError(
            f"droplet{'s' if len(missing) > 1 else ''} {', '.join(repr(n) for n in missing)} "
            f"tagged {settings.tag!r} {'have' if len(missing) > 1 else 'has'} no "
            f"{settings.address} IPv4 address (GPUFLEET_ADDRESS={settings.address}); "
            f"use GPUFLEET_ADDRESS={other} or give the droplet a {settings.address} address"
        )
    hosts = [(d.name, host_data(d, settings)) for d in sorted(droplets, key=lambda d: d.name)]
    groups: Groups = {group_name(settings.tag): (hosts, {})}
    groups.setdefault(GPU_GROUP, ([(name, dict(data)) for name, data in hosts], {}))
    return groups


def ensure_known_hosts(path: str) -> None:
    """Create the project's known_hosts file (0600) and its directory (0700) if missing."""
    file = Path(path)
    try:
        if not file.parent.is_dir():
            file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            file.parent.chmod(0o700)  # mkdir's mode is filtered by the umask
        if not file.exists():
            try:
                os.close(os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                pass  # created concurrently
    except OSError as exc:
        raise InventoryError(
            f"cannot create the known_hosts file {path} (GPUFLEET_KNOWN_HOSTS): "
            f"{exc.strerror or exc}"
        ) from None


def _explain(exc: DigitalOceanError, settings: InventorySettings) -> str:
    if exc.status in (401, 403):
        verdict = "rejected the token" if exc.status == 401 else "refused the request"
        detail = f"HTTP {exc.status}" + (f": {exc.api_message}" if exc.api_message else "")
        return (
            f"the DigitalOcean API at {settings.api_url} {verdict} ({detail}); check "
            "DIGITALOCEAN_TOKEN (it needs droplet read access, scope droplet:read and tag:read)"
        )
    return str(exc)


def load_do_inventory(
    environ: Mapping[str, str] | None = None,
    client_factory: Callable[[str, str], DigitalOceanClient] = DigitalOceanClient,
) -> Groups:
    """Droplets tagged ``GPUFLEET_TAG`` as pyinfra groups (see ``build_groups``)."""
    settings = settings_from_env(os.environ if environ is None else environ)
    try:
        client = client_factory(settings.token, settings.api_url)
        droplets = client.list_droplets(settings.tag)
    except DigitalOceanError as exc:
        raise InventoryError(_explain(exc, settings)) from None
    groups = build_groups(droplets, settings)
    ensure_known_hosts(settings.known_hosts)
    return groups
