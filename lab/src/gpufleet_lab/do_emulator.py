"""Lab stand-in: an emulator of the DigitalOcean API endpoints gpufleet uses.

This is NOT DigitalOcean. It is a small stdlib HTTP server that answers the few ``/v2``
endpoints our client calls, with the JSON shapes of the public API (OpenAPI spec,
``digitalocean/openapi``), so the inventory, rollout and disaster-recovery code paths run
unchanged against it. Droplets come from the lab's ``lab.json`` (re-read when it changes) or
from a list given by a test.

Endpoints (all require ``Authorization: Bearer <token>``; anything else answers 401
``{"id": "unauthorized", "message": "Unable to authenticate you"}``):

* ``GET  /v2/droplets``                 ``tag_name``, ``type=gpus|droplets``, ``name``,
  ``page``, ``per_page`` (default 20, max 200); ``links.pages`` first/prev/next/last as
  absolute URLs on the emulator's base URL; ``meta.total``.
* ``GET  /v2/droplets/{id}``
* ``POST /v2/droplets/{id}/actions``    rebuild {image}, power_cycle, reboot, power_off,
  power_on, shutdown, snapshot {name} -> 201 ``{"action": {...}}`` (status ``in-progress``)
* ``GET  /v2/droplets/{id}/actions`` and ``GET /v2/droplets/{id}/actions/{action_id}``
* ``GET  /v2/actions/{id}``
* ``GET  /v2/droplets/{id}/snapshots``
* ``GET  /v2/snapshots?resource_type=droplet``
* ``GET  /v2/sizes``                    ``page``, ``per_page``: every size below, GPU sizes
  included (the real listing has no type filter); ``regions`` empty and ``available`` false for
  the sizes named in the ``unavailable_sizes`` option (an account that cannot buy them).
* ``GET|POST /v2/tags``, ``GET|DELETE /v2/tags/{name}``, ``POST|DELETE
  /v2/tags/{name}/resources`` ``{"resources": [{"resource_id": "<id>", "resource_type":
  "droplet"}]}`` -> 204. Tags a droplet gains or loses here are kept on top of lab.json's and
  show in every droplet object and in ``?tag_name=``.
* ``GET|POST /v2/firewalls``, ``GET|PUT|DELETE /v2/firewalls/{id}`` (POST 202, PUT a full
  replacement 200, DELETE 204); status ``waiting`` until the network applied it, then
  ``succeeded``.
* ``GET|POST /v2/load_balancers``, ``GET|PUT|DELETE /v2/load_balancers/{id}`` (same codes);
  status ``new`` (``ip`` "") until it runs, then ``active``; ``droplet_ids`` follow its ``tag``.

Firewalls and load balancers are realized by an injectable ``cloudnet.Network`` (a reconcile
thread hands it the resolved plan on every change and every ``RECONCILE_INTERVAL``); the lab's
services daemon passes ``cloudnet.LabNetwork`` (iptables in the hosts' netns, HAProxy in a netns
of its own), the default ``NullNetwork`` realizes nothing.

Lab knobs (same token; never counted or rate limited):

* ``POST /_lab/ratelimit {"count": N, "retry_after": S}``: the next N API requests answer 429
  ``{"id": "too_many_requests", "message": "API Rate limit exceeded."}`` with ``Retry-After``
  and ``ratelimit-*`` headers.
* ``POST /_lab/errors {"count": N, "status": 503}``: the next N API requests answer that 5xx.
* ``POST /_lab/actions {"count": N, "outcome": "errored"|"no_boot", "hold": S}``: the next N
  droplet actions stay ``in-progress`` for S seconds (default 0), then ``errored`` (the droplet
  untouched: the API failed), or, ``no_boot``, ``completed`` after the action's hook and the
  power-off hook ran (a droplet whose rebuilt system never boots: status ``active``, no SSH).
  A long hold is an action that never finishes, for a client's timeout.
* ``GET /_lab/load_balancers/{id}/backends`` (also ``/lab/...``): ``{"backends":
  [{"droplet_id", "address", "status": "healthy"|"unhealthy"|"draining"}]}`` as the network
  sees them (HAProxy's runtime API in the lab).

Actions run in a worker thread per action and call the injectable hooks (``Hooks``); the lab
wires them to the real host functions (rebuild really wipes the lab host). Status goes
``in-progress`` -> ``completed``, or ``errored`` when the hook raised.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import re
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

from gpufleet.model import gpus as catalogue
from gpufleet_lab import cloudnet, do_cloud
from gpufleet_lab.httpserve import base_url, serve_until_interrupted

HostRecord = dict[str, Any]
DropletsSource = str | os.PathLike[str] | Iterable[Mapping[str, Any]] | Callable[[], list]

DEFAULT_PER_PAGE = 20
MAX_PER_PAGE = 200
RATE_LIMIT_PER_HOUR = 5000
RECONCILE_INTERVAL = 0.5  # seconds between network reconciles (lab.json changes, drains)

# --------------------------------------------------------------------------------------------
# Sizes, images and regions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SizeSpec:
    """One DigitalOcean size as the emulator reports it (memory in MiB, disk in GiB)."""

    slug: str
    memory: int
    vcpus: int
    disk: int
    price_hourly: float
    description: str
    gpu_count: int = 0
    gpu_vram_gib: int = 0
    gpu_model: str | None = None

    def gpu_info(self) -> dict[str, Any] | None:
        if not self.gpu_count:
            return None
        return {
            "count": self.gpu_count,
            "vram": {"amount": self.gpu_vram_gib, "unit": "gib"},
            "model": self.gpu_model,
        }


def list_price(slug: str) -> float:
    """gpufleet's catalogue list price of a DigitalOcean size: one source for both."""
    price = catalogue.lookup(slug).price_hourly
    if price is None:
        raise ValueError(f"the catalogue has no list price for {slug}")
    return price


SIZES: dict[str, SizeSpec] = {
    s.slug: s
    for s in (
        # Real DigitalOcean GPU sizes at the catalogue's list prices. The catalogue's sizes
        # without a list price (H200) are left out: the lab account cannot buy them, as with a
        # per-contract size, which /v2/sizes does not list. vCPU, RAM and disk of the L40S and
        # RTX 6000 Ada sizes are lab values, not checked against DigitalOcean's plans.
        SizeSpec(
            "gpu-h100x1-80gb", 245760, 20, 720, list_price("gpu-h100x1-80gb"), "H100 GPU - 1X",
            1, 80, "nvidia_h100",
        ),
        SizeSpec(
            "gpu-h100x8-640gb", 1966080, 160, 2046, list_price("gpu-h100x8-640gb"),
            "H100 GPU - 8X", 8, 80, "nvidia_h100",
        ),
        SizeSpec(
            "gpu-4000adax1-20gb",
            32768,
            8,
            500,
            list_price("gpu-4000adax1-20gb"),
            "RTX 4000 Ada GPU - 1X",
            1,
            20,
            "nvidia_rtx4000_ada",
        ),
        SizeSpec(
            "gpu-l40sx1-48gb", 65536, 8, 500, list_price("gpu-l40sx1-48gb"), "L40S GPU - 1X",
            1, 48, "nvidia_l40s",
        ),
        SizeSpec(
            "gpu-6000adax1-48gb", 65536, 8, 500, list_price("gpu-6000adax1-48gb"),
            "RTX 6000 Ada GPU - 1X", 1, 48, "nvidia_rtx6000_ada",
        ),
        # LAB-ONLY slugs. DigitalOcean sells H100 droplets with 1 or 8 GPUs, not 2, and no T4.
        # The lab needs a 2-GPU host (tensor parallelism = 2) and a 16 GB GPU that is too small
        # for Llama 3 8B in bf16, so these follow DigitalOcean's naming scheme
        # gpu-<model>x<count>-<total VRAM>gb (x1-80gb, x8-640gb -> x2-160gb) and are marked as
        # such in their description. No gpufleet code may depend on them existing upstream.
        SizeSpec(
            "gpu-h100x2-160gb",
            491520,
            40,
            1440,
            6.78,
            "H100 GPU - 2X (lab only)",
            2,
            80,
            "nvidia_h100",
        ),
        SizeSpec(
            "gpu-t4x1-16gb", 16384, 4, 160, 0.35, "T4 GPU - 1X (lab only)", 1, 16, "nvidia_t4"
        ),
        # A real CPU size for the no-GPU profile.
        SizeSpec("s-4vcpu-8gb", 8192, 4, 160, 0.07143, "Basic"),
    )
}

# Lab GPU profile -> (size slug, image slug). ``nodriver`` is a normal H100 droplet as far as
# the API can tell: the broken driver is a condition of the host, not of the size. ``nogpu`` is
# a CPU droplet on plain Ubuntu, which also makes it the droplet that a ``type=gpus`` listing
# never returns. Multi-GPU sizes get the multi-GPU AI/ML image, single-GPU ones gpu-h100x1-base
# (DigitalOcean recommends it for every single-GPU NVIDIA plan, H100 or not).
PROFILES: dict[str, tuple[str, str]] = {
    "h100": ("gpu-h100x1-80gb", "gpu-h100x1-base"),
    "h100x2": ("gpu-h100x2-160gb", "gpu-h100x8-base"),
    "rtx4000ada": ("gpu-4000adax1-20gb", "gpu-h100x1-base"),
    "t4": ("gpu-t4x1-16gb", "gpu-h100x1-base"),
    "nodriver": ("gpu-h100x1-80gb", "gpu-h100x1-base"),
    "nogpu": ("s-4vcpu-8gb", "ubuntu-24-04-x64"),
}
DEFAULT_PROFILE = "h100"

IMAGES: dict[str, dict[str, Any]] = {
    "gpu-h100x1-base": {"id": 171634561, "name": "AI/ML Ready H100x1", "distribution": "Ubuntu"},
    "gpu-h100x8-base": {"id": 171634562, "name": "AI/ML Ready H100x8", "distribution": "Ubuntu"},
    "ubuntu-24-04-x64": {"id": 160432781, "name": "24.04 (LTS) x64", "distribution": "Ubuntu"},
    "ubuntu-22-04-x64": {"id": 129211873, "name": "22.04 (LTS) x64", "distribution": "Ubuntu"},
}

REGIONS: dict[str, str] = {
    "nyc2": "New York 2",
    "tor1": "Toronto 1",
    "atl1": "Atlanta 1",
    "ams3": "Amsterdam 3",
    "nyc3": "New York 3",
    "sfo3": "San Francisco 3",
}
DEFAULT_REGION = "nyc2"

ACTION_TYPES = ("rebuild", "power_cycle", "reboot", "power_off", "power_on", "shutdown", "snapshot")


def _now_iso(clock: Callable[[], float] = time.time) -> str:
    return datetime.fromtimestamp(clock(), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def size_for(record: Mapping[str, Any]) -> SizeSpec:
    """The size of a lab host record: its ``size`` slug if known, else its profile's size."""
    profile = str(record.get("profile") or DEFAULT_PROFILE)
    profile_slug = PROFILES.get(profile, PROFILES[DEFAULT_PROFILE])[0]
    slug = str(record.get("size") or profile_slug)
    if slug in SIZES:
        return SIZES[slug]
    # An unknown slug written by the lab: keep the slug, borrow the profile's shape.
    return SizeSpec(**{**SIZES[profile_slug].__dict__, "slug": slug})


def image_for(record: Mapping[str, Any]) -> dict[str, Any]:
    profile = str(record.get("profile") or DEFAULT_PROFILE)
    slug = PROFILES.get(profile, PROFILES[DEFAULT_PROFILE])[1]
    return image_json(slug)


def image_json(slug: str) -> dict[str, Any]:
    meta = IMAGES[slug]
    return {
        "id": meta["id"],
        "name": meta["name"],
        "distribution": meta["distribution"],
        "slug": slug,
        "public": True,
        "regions": sorted(REGIONS),
        "created_at": "2024-10-01T00:00:00Z",
        "type": "base",
        "min_disk_size": 20,
        "size_gigabytes": 2.4,
        "description": "",
        "tags": [],
        "status": "available",
        "error_message": "",
    }


def _gateway(ip: str) -> str:
    return ".".join(ip.split(".")[:3] + ["1"])


def droplet_json(
    record: Mapping[str, Any],
    *,
    status: str = "active",
    image: Mapping[str, Any] | None = None,
    snapshot_ids: Iterable[int] = (),
    created_at: str = "2025-01-01T00:00:00Z",
) -> dict[str, Any]:
    """The API's droplet object for one lab host record (a pure function)."""
    size = size_for(record)
    region = str(record.get("region") or DEFAULT_REGION)
    v4: list[dict[str, Any]] = []
    for kind, key in (("public", "public_ip"), ("private", "private_ip")):
        ip = record.get(key)
        if ip:
            v4.append(
                {
                    "ip_address": ip,
                    "netmask": "255.255.255.0",
                    "gateway": _gateway(ip),
                    "type": kind,
                }
            )
    size_obj = size_json(size, [region])
    droplet: dict[str, Any] = {
        "id": int(record["droplet_id"]),
        "name": str(record["droplet_name"]),
        "memory": size.memory,
        "vcpus": size.vcpus,
        "disk": size.disk,
        "locked": False,
        "status": status,
        "kernel": None,
        "created_at": str(record.get("created_at") or created_at),
        "features": ["monitoring", "droplet_agent", "private_networking"],
        "backup_ids": [],
        "next_backup_window": None,
        "snapshot_ids": list(snapshot_ids),
        "image": dict(image) if image is not None else image_for(record),
        "volume_ids": [],
        "size": size_obj,
        "size_slug": size.slug,
        "networks": {"v4": v4, "v6": []},
        "region": {
            "name": REGIONS.get(region, region),
            "slug": region,
            "features": ["backups", "ipv6", "metadata", "install_agent", "storage"],
            "available": True,
            "sizes": [size.slug],
        },
        "tags": [str(t) for t in record.get("tags") or []],
        "vpc_uuid": "5a4981aa-9653-4bd1-bef5-d6bff52042e4",
    }
    gpu_info = size.gpu_info()
    if gpu_info is not None:
        droplet["gpu_info"] = gpu_info
    return droplet


def size_json(size: SizeSpec, regions: Iterable[str]) -> dict[str, Any]:
    """The API's size object (in a droplet, or an entry of ``GET /v2/sizes``): no regions and
    ``available`` false for a size the account cannot buy."""
    regions = sorted(regions)
    obj: dict[str, Any] = {
        "slug": size.slug,
        "memory": size.memory,
        "vcpus": size.vcpus,
        "disk": size.disk,
        "transfer": 15.0 if size.gpu_count else 5.0,
        "price_monthly": round(size.price_hourly * 672, 2),
        "price_hourly": size.price_hourly,
        "regions": regions,
        "available": bool(regions),
        "description": size.description,
    }
    gpu_info = size.gpu_info()
    if gpu_info is not None:
        obj["gpu_info"] = gpu_info
        obj["disk_info"] = [{"type": "local", "size": {"amount": size.disk, "unit": "gib"}}]
    return obj


def is_gpu(record: Mapping[str, Any]) -> bool:
    return size_for(record).gpu_count > 0


# --------------------------------------------------------------------------------------------
# Hooks and state
# --------------------------------------------------------------------------------------------


def _noop(*_args: Any) -> None:
    return None


@dataclass
class Hooks:
    """Callbacks run (in a worker thread) when an action is performed.

    ``droplet`` is a copy of the droplet's lab host record (the ``hosts[]`` entry of lab.json:
    index, machine, droplet_name, droplet_id, profile, flavour, public_ip, private_ip, region,
    size, tags). ``image`` is what the rebuild request named (a slug or an id). The snapshot
    hook gets the name and the id the snapshot will have, and may return its size in bytes.
    A hook that raises makes the action ``errored``.
    """

    on_rebuild: Callable[[HostRecord, Any], object] = _noop
    on_power_cycle: Callable[[HostRecord], object] = _noop
    on_reboot: Callable[[HostRecord], object] = _noop
    on_snapshot: Callable[[HostRecord, str, int], object] = _noop
    on_power_off: Callable[[HostRecord], object] = _noop
    on_power_on: Callable[[HostRecord], object] = _noop
    on_shutdown: Callable[[HostRecord], object] = _noop


class _LabJsonSource:
    """Host records from lab.json, re-read whenever its mtime or size changes."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._key: tuple[int, int] | None = None
        self._hosts: list[HostRecord] = []
        self._lock = threading.Lock()

    def __call__(self) -> list[HostRecord]:
        with self._lock:
            try:
                st = self.path.stat()
            except FileNotFoundError:
                self._key, self._hosts = None, []
                return []
            key = (st.st_mtime_ns, st.st_size)
            if key != self._key:
                try:
                    data = json.loads(self.path.read_text(encoding="utf-8"))
                except (OSError, ValueError) as exc:
                    # A half-written file: keep serving the last good content (retry next time).
                    print(f"do_emulator: cannot read {self.path}: {exc}", file=sys.stderr)
                    return list(self._hosts)
                self._hosts = [dict(h) for h in data.get("hosts", [])]
                self._key = key
            return list(self._hosts)


def _make_source(source: DropletsSource) -> Callable[[], list[HostRecord]]:
    if isinstance(source, (str, os.PathLike)):
        return _LabJsonSource(source)
    if callable(source):
        return lambda: [dict(h) for h in source()]
    fixed = [dict(h) for h in source]
    return lambda: [dict(h) for h in fixed]


@dataclass
class Action:
    id: int
    type: str
    droplet_id: int
    region_slug: str
    started_at: str
    status: str = "in-progress"
    completed_at: str | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "type": self.type,
            "started_at": self.started_at,
            "completed_at": self.completed_at,
            "resource_id": self.droplet_id,
            "resource_type": "droplet",
            "region": {
                "name": REGIONS.get(self.region_slug, self.region_slug),
                "slug": self.region_slug,
                "available": True,
            },
            "region_slug": self.region_slug,
        }


@dataclass
class Snapshot:
    id: int
    name: str
    droplet_id: int
    region_slug: str
    created_at: str
    min_disk_size: int
    size_gigabytes: float = 12.5  # the lab's hook gives the size of the disk it copied

    def droplet_json(self) -> dict[str, Any]:
        """Shape of ``GET /v2/droplets/{id}/snapshots`` items (integer id)."""
        return {
            "id": self.id,
            "name": self.name,
            "distribution": "Ubuntu",
            "slug": None,
            "public": False,
            "regions": [self.region_slug],
            "created_at": self.created_at,
            "min_disk_size": self.min_disk_size,
            "type": "snapshot",
            "size_gigabytes": self.size_gigabytes,
        }

    def snapshots_json(self) -> dict[str, Any]:
        """Shape of ``GET /v2/snapshots`` items (string ids)."""
        return {
            "id": str(self.id),
            "name": self.name,
            "created_at": self.created_at,
            "regions": [self.region_slug],
            "resource_id": str(self.droplet_id),
            "resource_type": "droplet",
            "min_disk_size": self.min_disk_size,
            "size_gigabytes": self.size_gigabytes,
            "tags": [],
        }

    def image_json(self) -> dict[str, Any]:
        """The droplet's ``image`` after a rebuild from this snapshot."""
        return {
            "id": self.id,
            "name": self.name,
            "distribution": "Ubuntu",
            "slug": None,
            "public": False,
            "regions": [self.region_slug],
            "created_at": self.created_at,
            "type": "snapshot",
            "min_disk_size": self.min_disk_size,
            "size_gigabytes": self.size_gigabytes,
            "description": "",
            "tags": [],
            "status": "available",
            "error_message": "",
        }


@dataclass
class _DropletOverride:
    status: str = "active"
    image: dict[str, Any] | None = None
    snapshot_ids: list[int] = field(default_factory=list)


def _firewall_order(fw: dict[str, Any]) -> dict[str, Any]:
    order = ["id", "name", "status", "created_at", "pending_changes", "inbound_rules",
             "outbound_rules", "droplet_ids", "tags"]
    return {k: fw[k] for k in order}


class ApiError(Exception):
    def __init__(self, status: int, error_id: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_id = error_id
        self.message = message


NOT_FOUND = "The resource you were accessing could not be found."


class EmulatorState:
    """Everything the request handler and the action workers share (guarded by ``lock``)."""

    def __init__(
        self,
        token: str,
        source: DropletsSource,
        hooks: Hooks | None = None,
        *,
        ratelimit_next: int = 0,
        retry_after: int = 1,
        action_delay: float = 0.0,
        max_per_page: int = MAX_PER_PAGE,
        tag_filter_includes_gpus: bool = True,
        unavailable_sizes: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
        network: cloudnet.Network | None = None,
    ) -> None:
        if not token:
            raise ValueError("the emulator needs a token")
        self.token = token
        self.hosts = _make_source(source)
        self.hooks = hooks or Hooks()
        self.lock = threading.Lock()
        self.ratelimit_next = ratelimit_next
        self.retry_after = retry_after
        self.errors_next = 0
        self.errors_status = 503
        self.action_faults: list[tuple[str, float]] = []  # (outcome, hold) of the next actions
        self.action_delay = action_delay
        # Tests: a server that pages smaller than asked, and the other reading of the GPU
        # caveat (a tag_name listing that leaves GPU droplets out).
        self.max_per_page = max_per_page
        self.tag_filter_includes_gpus = tag_filter_includes_gpus
        self.unavailable_sizes = frozenset(unavailable_sizes)
        self.clock = clock
        self.started_at = _now_iso(clock)
        self.requests: list[tuple[str, str]] = []  # (method, path?query) - never headers
        self.served = 0
        self.overrides: dict[int, _DropletOverride] = {}
        self.actions: dict[int, Action] = {}
        self.snapshots: dict[int, Snapshot] = {}
        self.threads: list[threading.Thread] = []
        self._next_action_id = 2_000_000_001
        self._next_snapshot_id = 180_000_001
        self.network: cloudnet.Network = network or cloudnet.NullNetwork()
        self.tags: dict[str, None] = {}  # created by POST /v2/tags (in order)
        self.tags_added: dict[int, dict[str, None]] = {}  # droplet -> tags on top of lab.json's
        self.tags_removed: dict[int, set[str]] = {}
        self.firewalls: dict[str, dict[str, Any]] = {}
        self.load_balancers: dict[str, dict[str, Any]] = {}
        self.lb_slots: dict[str, int] = {}
        self._versions: dict[str, int] = {}  # firewall/LB id -> edits (status after apply)
        self._changed = threading.Event()
        self._stopping = threading.Event()
        self._reconciler: threading.Thread | None = None

    # -- droplets ---------------------------------------------------------------------------

    def records(self) -> list[HostRecord]:
        """lab.json's host records, their ``tags`` as the tags API left them."""
        with self.lock:
            recs = [self._tagged(r) for r in self.hosts()]
        return sorted(recs, key=lambda r: int(r["droplet_id"]))

    def record(self, droplet_id: int) -> HostRecord:
        for rec in self.records():
            if int(rec["droplet_id"]) == droplet_id:
                return rec
        raise ApiError(404, "not_found", NOT_FOUND)

    def _tagged(self, rec: HostRecord) -> HostRecord:
        droplet_id = int(rec["droplet_id"])
        removed = self.tags_removed.get(droplet_id, set())
        tags = [str(t) for t in rec.get("tags") or [] if str(t) not in removed]
        tags += [t for t in self.tags_added.get(droplet_id, {}) if t not in tags]
        return {**rec, "tags": tags}

    def _exists(self, droplet_id: int) -> bool:
        return any(int(r["droplet_id"]) == droplet_id for r in self.hosts())

    def droplet(self, rec: HostRecord) -> dict[str, Any]:
        with self.lock:
            ov = self.overrides.get(int(rec["droplet_id"]), _DropletOverride())
            return droplet_json(
                rec,
                status=ov.status,
                image=ov.image,
                snapshot_ids=list(ov.snapshot_ids),
                created_at=self.started_at,
            )

    def _override(self, droplet_id: int) -> _DropletOverride:
        return self.overrides.setdefault(droplet_id, _DropletOverride())

    # -- tags -------------------------------------------------------------------------------

    def tag_names(self) -> list[str]:
        """Created tags, then those only lab.json gave (a tag exists while something has it)."""
        names = dict(self.tags)
        for rec in self.records():
            names.update(dict.fromkeys(rec["tags"]))
        return list(names)

    def tag(self, name: str) -> dict[str, Any]:
        if name not in self.tag_names():
            raise ApiError(404, "not_found", NOT_FOUND)
        tagged = [r for r in self.records() if name in r["tags"]]
        last = f"/v2/droplets/{tagged[-1]['droplet_id']}" if tagged else ""
        return do_cloud.tag_json(name, len(tagged), last)

    def create_tag(self, body: Mapping[str, Any]) -> dict[str, Any]:
        name = self._cloud(do_cloud.check_tag_name, body.get("name"))
        with self.lock:
            self.tags[name] = None
        return self.tag(name)

    def delete_tag(self, name: str) -> None:
        if name not in self.tag_names():
            raise ApiError(404, "not_found", NOT_FOUND)
        with self.lock:
            self.tags.pop(name, None)
            for rec in self.hosts():
                self._untag(int(rec["droplet_id"]), name)
        self._changed.set()

    def tag_resources(self, name: str, body: Mapping[str, Any], *, add: bool) -> None:
        if name not in self.tag_names():
            raise ApiError(404, "not_found", NOT_FOUND)
        ids = self._cloud(do_cloud.tag_resources, body, self._exists)
        with self.lock:
            for droplet_id in ids:
                if add:
                    self.tags_removed.get(droplet_id, set()).discard(name)
                    self.tags_added.setdefault(droplet_id, {})[name] = None
                else:
                    self._untag(droplet_id, name)
        self._changed.set()

    def _untag(self, droplet_id: int, name: str) -> None:
        self.tags_added.get(droplet_id, {}).pop(name, None)
        self.tags_removed.setdefault(droplet_id, set()).add(name)

    def _cloud(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, a refused request as the API's error."""
        try:
            return fn(*args)
        except do_cloud.CloudError as err:
            error_id = "not_found" if err.status == 404 else "unprocessable_entity"
            raise ApiError(err.status, error_id, err.message) from None

    # -- firewalls --------------------------------------------------------------------------

    def put_firewall(self, body: Mapping[str, Any], fw_id: str | None = None) -> dict[str, Any]:
        """Create (``fw_id`` None) or fully replace a firewall; its JSON (status waiting)."""
        with self.lock:
            if fw_id is not None and fw_id not in self.firewalls:
                raise ApiError(404, "not_found", NOT_FOUND)
        fields = self._cloud(do_cloud.firewall_fields, body, self._exists,
                             lambda uid: uid in self.load_balancers)
        with self.lock:
            if fw_id is None:
                fw_id = str(uuid.uuid4())
                self.firewalls[fw_id] = {"id": fw_id, "created_at": _now_iso(self.clock)}
            fw = self.firewalls[fw_id]
            fw.update(fields, status="waiting", pending_changes=[])
            self._versions[fw_id] = self._versions.get(fw_id, 0) + 1
            created = json.loads(json.dumps(fw))
        self._changed.set()
        return _firewall_order(created)

    def firewall(self, fw_id: str) -> dict[str, Any]:
        with self.lock:
            fw = self.firewalls.get(fw_id)
            if fw is None:
                raise ApiError(404, "not_found", NOT_FOUND)
            return _firewall_order(json.loads(json.dumps(fw)))

    def delete_firewall(self, fw_id: str) -> None:
        with self.lock:
            if self.firewalls.pop(fw_id, None) is None:
                raise ApiError(404, "not_found", NOT_FOUND)
        self._changed.set()

    # -- load balancers ---------------------------------------------------------------------

    def put_load_balancer(self, body: Mapping[str, Any],
                          lb_id: str | None = None) -> dict[str, Any]:
        """Create (``lb_id`` None) or fully replace a load balancer; its JSON."""
        with self.lock:
            if lb_id is not None and lb_id not in self.load_balancers:
                raise ApiError(404, "not_found", NOT_FOUND)
        fields = self._cloud(do_cloud.load_balancer_fields, body, self._exists, REGIONS)
        with self.lock:
            if lb_id is None:
                free = [n for n in range(1, cloudnet.MAX_LB_SLOT + 1)
                        if n not in self.lb_slots.values()]
                if not free:
                    raise ApiError(422, "unprocessable_entity",
                                   "The lab has no address left for another load balancer.")
                lb_id = str(uuid.uuid4())
                self.lb_slots[lb_id] = free[0]
                self.load_balancers[lb_id] = {"id": lb_id, "ip": "", "status": "new",
                                              "created_at": _now_iso(self.clock)}
            self.load_balancers[lb_id].update(fields)
            self._versions[lb_id] = self._versions.get(lb_id, 0) + 1
        self._changed.set()
        return self.load_balancer(lb_id)

    def load_balancer(self, lb_id: str) -> dict[str, Any]:
        records = self.records()
        with self.lock:
            lb = self.load_balancers.get(lb_id)
            if lb is None:
                raise ApiError(404, "not_found", NOT_FOUND)
            return self._lb_json(lb, records)

    def load_balancer_list(self) -> list[dict[str, Any]]:
        records = self.records()
        with self.lock:
            return [self._lb_json(lb, records) for lb in self.load_balancers.values()]

    def delete_load_balancer(self, lb_id: str) -> None:
        with self.lock:
            if self.load_balancers.pop(lb_id, None) is None:
                raise ApiError(404, "not_found", NOT_FOUND)
            self.lb_slots.pop(lb_id, None)
        self._changed.set()

    def lb_backends(self, lb_id: str) -> list[dict[str, Any]]:
        with self.lock:
            if lb_id not in self.load_balancers:
                raise ApiError(404, "not_found", NOT_FOUND)
        return self.network.lb_backends(lb_id)

    def _lb_members(self, lb: Mapping[str, Any], records: list[HostRecord]) -> list[HostRecord]:
        if lb["tag"]:
            return [r for r in records if lb["tag"] in r["tags"]]
        return [r for r in records if int(r["droplet_id"]) in lb["droplet_ids"]]

    def _lb_json(self, lb: Mapping[str, Any], records: list[HostRecord]) -> dict[str, Any]:
        obj = json.loads(json.dumps(lb))
        region = str(lb["region"])
        obj["region"] = {
            "name": REGIONS.get(region, region),
            "slug": region,
            "features": ["backups", "ipv6", "metadata", "install_agent", "storage"],
            "available": True,
            "sizes": sorted(SIZES),
        }
        obj["droplet_ids"] = [int(r["droplet_id"]) for r in self._lb_members(lb, records)]
        obj["type"] = "REGIONAL"
        obj["algorithm"] = "round_robin"
        obj["disable_lets_encrypt_dns_records"] = False
        order = ["id", "name", "ip", "size_unit", "type", "algorithm", "status", "created_at",
                 "forwarding_rules", "health_check", "sticky_sessions", "region", "tag",
                 "droplet_ids", "redirect_http_to_https", "enable_proxy_protocol",
                 "enable_backend_keepalive", "http_idle_timeout_seconds", "vpc_uuid",
                 "disable_lets_encrypt_dns_records", "network"]
        return {k: obj[k] for k in order}

    # -- the network ------------------------------------------------------------------------

    def network_plan(self) -> tuple[cloudnet.NetworkPlan, dict[str, int]]:
        """What the network should be now, and the edit count of each object it covers."""
        records = self.records()
        with self.lock:
            lbs = [(dict(lb), self.lb_slots[i]) for i, lb in self.load_balancers.items()]
            firewalls = [dict(fw) for fw in self.firewalls.values()]
            versions = dict(self._versions)
        addresses = {str(lb["id"]): self.network.lb_addresses(slot) for lb, slot in lbs}
        views = [
            cloudnet.HostView(int(r["droplet_id"]), str(r.get("machine") or ""),
                              frozenset(r["tags"]),
                              tuple(ip for ip in (r.get("public_ip"), r.get("private_ip")) if ip))
            for r in records
        ]
        fw_plan = cloudnet.resolve_firewalls([v for v in views if v.machine], firewalls,
                                             addresses)
        specs = tuple(
            do_cloud.lb_spec(lb, slot, addresses[str(lb["id"])], [
                cloudnet.Member(int(r["droplet_id"]), str(r["private_ip"]))
                for r in self._lb_members(lb, records) if r.get("private_ip")
            ])
            for lb, slot in lbs
        )
        return cloudnet.NetworkPlan(fw_plan, specs), versions

    def reconcile(self) -> None:
        """Apply the plan; mark what it covered as applied (firewall succeeded, LB active)."""
        plan, versions = self.network_plan()
        self.network.apply(plan)
        addresses = {spec.id: spec for spec in plan.lbs}
        with self.lock:
            for fw_id, fw in self.firewalls.items():
                if self._versions.get(fw_id) == versions.get(fw_id):
                    fw["status"] = "succeeded"
            for lb_id, lb in self.load_balancers.items():
                spec = addresses.get(lb_id)
                if spec is not None and self._versions.get(lb_id) == versions.get(lb_id):
                    lb["status"] = "active"
                    lb["ip"] = spec.private_ip if lb["network"] == "INTERNAL" else spec.public_ip

    def start_reconciler(self) -> None:
        if self._reconciler is None:
            self._reconciler = threading.Thread(target=self._reconcile_loop,
                                                name="do-reconcile", daemon=True)
            self._reconciler.start()

    def _reconcile_loop(self) -> None:
        while not self._stopping.is_set():
            self._changed.clear()
            try:
                self.reconcile()
            except Exception:  # noqa: BLE001 - report, retry next round
                print(f"do_emulator: reconcile failed:\n{traceback.format_exc()}",
                      file=sys.stderr)
            self._changed.wait(RECONCILE_INTERVAL)

    def close(self) -> None:
        """Stop reconciling and take down what the network made."""
        self._stopping.set()
        self._changed.set()
        if self._reconciler is not None:
            self._reconciler.join(30)
            self._reconciler = None
        self.network.close()

    # -- actions ----------------------------------------------------------------------------

    def start_action(self, droplet_id: int, body: Mapping[str, Any]) -> dict[str, Any]:
        """Start an action in a worker thread; its JSON as it was at creation (in-progress)."""
        rec = self.record(droplet_id)
        kind = body.get("type")
        if kind not in ACTION_TYPES:
            raise ApiError(
                422,
                "unprocessable_entity",
                f"Action type {kind!r} is not supported; use one of {', '.join(ACTION_TYPES)}.",
            )
        args: tuple[Any, ...] = ()
        if kind == "rebuild":
            image = body.get("image")
            self._resolve_image(image)  # 422 now rather than an errored action later
            args = (image,)
        elif kind == "snapshot":
            name = body.get("name") or f"{rec['droplet_name']}-{int(self.clock() * 1000)}"
            args = (str(name),)
        with self.lock:
            for act in self.actions.values():
                if act.droplet_id == droplet_id and act.status == "in-progress":
                    raise ApiError(
                        422, "unprocessable_entity", "Droplet already has a pending event."
                    )
            action = Action(
                id=self._next_action_id,
                type=str(kind),
                droplet_id=droplet_id,
                region_slug=str(rec.get("region") or DEFAULT_REGION),
                started_at=_now_iso(self.clock),
            )
            self._next_action_id += 1
            self.actions[action.id] = action
            fault = self.action_faults.pop(0) if self.action_faults else None
            worker = threading.Thread(
                target=self._run_action,
                args=(action, dict(rec), args, fault),
                name=f"do-action-{action.id}",
                daemon=True,
            )
            self.threads = [t for t in self.threads if t.is_alive()] + [worker]
            created = action.to_json()
        worker.start()
        return created

    def _resolve_image(self, image: Any) -> dict[str, Any]:
        if isinstance(image, str) and image in IMAGES:
            return image_json(image)
        as_int: int | None = None
        if isinstance(image, int) and not isinstance(image, bool):
            as_int = image
        elif isinstance(image, str) and image.isdigit():
            as_int = int(image)
        if as_int is not None:
            with self.lock:
                snap = self.snapshots.get(as_int)
            if snap is not None:
                return snap.image_json()
            for slug, meta in IMAGES.items():
                if meta["id"] == as_int:
                    return image_json(slug)
        raise ApiError(
            422,
            "unprocessable_entity",
            f"You specified an invalid image for Droplet rebuild: {image!r}.",
        )

    def _run_action(self, action: Action, rec: HostRecord, args: tuple[Any, ...],
                    fault: tuple[str, float] | None = None) -> None:
        if self.action_delay:
            time.sleep(self.action_delay)
        if fault is not None:
            time.sleep(fault[1])
            if fault[0] == "errored":
                with self.lock:
                    action.status, action.error = "errored", "lab: injected failure"
                    action.completed_at = _now_iso(self.clock)
                return
        hooks = self.hooks
        hooks_by_type: dict[str, Callable[..., object]] = {
            "rebuild": hooks.on_rebuild,
            "power_cycle": hooks.on_power_cycle,
            "reboot": hooks.on_reboot,
            "snapshot": hooks.on_snapshot,
            "power_off": hooks.on_power_off,
            "power_on": hooks.on_power_on,
            "shutdown": hooks.on_shutdown,
        }
        hook = hooks_by_type[action.type]
        if action.type == "snapshot":
            with self.lock:
                args = (*args, self._next_snapshot_id)
                self._next_snapshot_id += 1
        try:
            made = hook(rec, *args)
            if fault is not None and fault[0] == "no_boot":
                hooks.on_power_off(rec)
            image = self._resolve_image(args[0]) if action.type == "rebuild" else None
        except Exception as exc:  # noqa: BLE001 - a failing hook is an errored action
            print(
                f"do_emulator: action {action.id} ({action.type}) on droplet "
                f"{action.droplet_id} errored:\n{traceback.format_exc()}",
                file=sys.stderr,
            )
            with self.lock:
                action.status, action.error = "errored", f"{type(exc).__name__}: {exc}"
                action.completed_at = _now_iso(self.clock)
            return
        with self.lock:
            ov = self._override(action.droplet_id)
            if action.type in ("power_off", "shutdown"):
                ov.status = "off"
            elif action.type in ("power_on", "power_cycle", "reboot", "rebuild"):
                ov.status = "active"
            if image is not None:
                ov.image = image
            if action.type == "snapshot":
                snap = Snapshot(
                    id=args[1],
                    name=args[0],
                    droplet_id=action.droplet_id,
                    region_slug=action.region_slug,
                    created_at=_now_iso(self.clock),
                    min_disk_size=size_for(rec).disk,
                )
                if isinstance(made, int) and not isinstance(made, bool):
                    snap.size_gigabytes = round(made / 1e9, 2)
                self.snapshots[snap.id] = snap
                ov.snapshot_ids.append(snap.id)
            action.status = "completed"
            action.completed_at = _now_iso(self.clock)

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Join the action workers (tests and shutdown)."""
        deadline = time.monotonic() + timeout
        with self.lock:
            threads = list(self.threads)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------

_DROPLET = re.compile(r"^/v2/droplets/(\d+)$")
_DROPLET_ACTIONS = re.compile(r"^/v2/droplets/(\d+)/actions$")
_DROPLET_ACTION = re.compile(r"^/v2/droplets/(\d+)/actions/(\d+)$")
_DROPLET_SNAPSHOTS = re.compile(r"^/v2/droplets/(\d+)/snapshots$")
_ACTION = re.compile(r"^/v2/actions/(\d+)$")
_TAG = re.compile(r"^/v2/tags/([^/]+)$")
_TAG_RESOURCES = re.compile(r"^/v2/tags/([^/]+)/resources$")
_FIREWALL = re.compile(r"^/v2/firewalls/([^/]+)$")
_LOAD_BALANCER = re.compile(r"^/v2/load_balancers/([^/]+)$")
_LAB_BACKENDS = re.compile(r"^/_?lab/load_balancers/([^/]+)/backends$")


def _param(query: Mapping[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


def _int_param(query: Mapping[str, list[str]], name: str, default: int) -> int:
    values = query.get(name)
    if not values:
        return default
    try:
        value = int(values[-1])
    except ValueError:
        raise ApiError(400, "bad_request", f"{name} must be an integer") from None
    if value < 1:
        raise ApiError(400, "bad_request", f"{name} must be at least 1")
    return value


def paginate(
    items: list[Any],
    base_url: str,
    path: str,
    query: Mapping[str, list[str]],
    max_per_page: int = MAX_PER_PAGE,
) -> tuple[list[Any], dict[str, Any]]:
    """One page of ``items`` and the API's ``links`` object (absolute URLs on ``base_url``).

    ``per_page`` defaults to 20 and is capped at ``max_per_page`` (the API's 200)."""
    per_page = min(_int_param(query, "per_page", DEFAULT_PER_PAGE), max_per_page)
    page = _int_param(query, "page", 1)
    last = max(1, -(-len(items) // per_page))
    chunk = items[(page - 1) * per_page : page * per_page]
    keep = {k: v[-1] for k, v in query.items() if k not in ("page", "per_page")}

    def url(n: int) -> str:
        return f"{base_url}{path}?{urlencode({**keep, 'page': n, 'per_page': per_page})}"

    pages: dict[str, str] = {}
    if page > 1:
        pages["first"] = url(1)
        pages["prev"] = url(min(page - 1, last))
    if page < last:
        pages["next"] = url(page + 1)
        pages["last"] = url(last)
    return chunk, {"pages": pages}


class EmulatorServer(ThreadingHTTPServer):
    daemon_threads = True
    state: EmulatorState
    _serve_thread: threading.Thread | None = None

    def start_background(self) -> threading.Thread:
        """Serve in a daemon thread; pair with ``close()``."""
        thread = threading.Thread(
            target=self.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="do-emulator",
            daemon=True,
        )
        thread.start()
        self._serve_thread = thread
        return thread

    def close(self) -> None:
        """Stop serving (if started with ``start_background``), free the port, join workers."""
        thread = self._serve_thread
        if thread is not None:
            self.shutdown()
            thread.join(10)
            self._serve_thread = None
        self.server_close()
        self.state.wait_idle(10)

    def server_close(self) -> None:
        """Free the port; stop reconciling and take down the firewalls and load balancers."""
        super().server_close()
        self.state.close()

    def __enter__(self) -> EmulatorServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Handler(BaseHTTPRequestHandler):
    server: EmulatorServer
    server_version = "gpufleet-do-emulator/1"

    # -- plumbing ---------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        if os.environ.get("GPUFLEET_DO_EMULATOR_VERBOSE"):
            super().log_message(format, *args)

    def _send(
        self, status: int, body: Any | None, headers: Mapping[str, str] | None = None
    ) -> None:
        state = self.server.state
        payload = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        defaults = {
            "ratelimit-limit": str(RATE_LIMIT_PER_HOUR),
            "ratelimit-remaining": str(max(0, RATE_LIMIT_PER_HOUR - state.served)),
            "ratelimit-reset": str(int(state.clock()) + 60),
        }
        for key, value in {**defaults, **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if payload:
            self.wfile.write(payload)

    def _error(self, err: ApiError, headers: Mapping[str, str] | None = None) -> None:
        self._send(err.status, {"id": err.error_id, "message": err.message}, headers)

    def _authorized(self) -> bool:
        expected = f"Bearer {self.server.state.token}".encode()
        got = (self.headers.get("Authorization") or "").encode()
        return hmac.compare_digest(got, expected)

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return {}
        try:
            data = json.loads(raw)
        except ValueError:
            raise ApiError(400, "bad_request", "The request body is not valid JSON.") from None
        if not isinstance(data, dict):
            raise ApiError(400, "bad_request", "The request body must be a JSON object.")
        return data

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        state = self.server.state
        parts = urlsplit(self.path)
        path, query = parts.path.rstrip("/") or "/", parse_qs(parts.query)
        try:
            if not self._authorized():
                raise ApiError(401, "unauthorized", "Unable to authenticate you")
            if path.startswith(("/_lab/", "/lab/")):
                self._send(200, self._lab(method, path, self._body()))
                return
            with state.lock:
                state.requests.append((method, self.path))
                state.served += 1
                if state.ratelimit_next > 0:
                    state.ratelimit_next -= 1
                    retry = state.retry_after
                    limited = True
                else:
                    limited = False
                injected = 0
                if not limited and state.errors_next > 0:
                    state.errors_next -= 1
                    injected = state.errors_status
            if limited:
                reset = int(state.clock()) + retry
                self._error(
                    ApiError(429, "too_many_requests", "API Rate limit exceeded."),
                    {
                        "Retry-After": str(retry),
                        "ratelimit-remaining": "0",
                        "ratelimit-reset": str(reset),
                    },
                )
                return
            if injected:
                raise ApiError(
                    injected, "server_error", "Server was unable to give you a response."
                )
            status, body = self._route(method, path, query)
            self._send(status, body)
        except ApiError as err:
            self._error(err)
        except Exception as exc:  # noqa: BLE001 - report, do not kill the server
            traceback.print_exc()
            self._error(ApiError(500, "server_error", f"emulator error: {exc}"))

    def _lab(self, method: str, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        state = self.server.state
        if method == "GET" and (m := _LAB_BACKENDS.match(path)):
            return {"backends": state.lb_backends(unquote(m.group(1)))}
        if method != "POST":
            raise ApiError(405, "method_not_allowed", "lab knobs are POST only")
        count = body.get("count", 1)
        if not isinstance(count, int) or count < 0:
            raise ApiError(400, "bad_request", "count must be a non-negative integer")
        with state.lock:
            if path == "/_lab/ratelimit":
                state.ratelimit_next = count
                state.retry_after = int(body.get("retry_after", state.retry_after))
                return {"ratelimit_next": count, "retry_after": state.retry_after}
            if path == "/_lab/errors":
                status = int(body.get("status", 503))
                if not 500 <= status <= 599:
                    raise ApiError(400, "bad_request", "status must be 5xx")
                state.errors_next, state.errors_status = count, status
                return {"errors_next": count, "status": status}
            if path == "/_lab/actions":
                outcome = body.get("outcome", "errored")
                if outcome not in ("errored", "no_boot"):
                    raise ApiError(400, "bad_request", "outcome must be errored or no_boot")
                hold = float(body.get("hold", 0))
                state.action_faults = [(str(outcome), hold)] * count
                return {"actions_next": count, "outcome": outcome, "hold": hold}
        raise ApiError(404, "not_found", NOT_FOUND)

    # -- the API ----------------------------------------------------------------------------

    def _route(
        self, method: str, path: str, query: Mapping[str, list[str]]
    ) -> tuple[int, dict[str, Any] | None]:
        state = self.server.state
        base = base_url(self.server)
        if path.startswith(("/v2/tags", "/v2/firewalls", "/v2/load_balancers")):
            return self._cloud_route(method, path, query)
        if method == "GET" and path == "/v2/droplets":
            return 200, self._list_droplets(base, path, query)
        if method == "GET" and path == "/v2/sizes":
            sizes = [
                size_json(s, () if s.slug in state.unavailable_sizes else REGIONS)
                for s in SIZES.values()
            ]
            chunk, links = paginate(sizes, base, path, query, state.max_per_page)
            return 200, {"sizes": chunk, "links": links, "meta": {"total": len(sizes)}}
        if method == "GET" and (m := _DROPLET.match(path)):
            return 200, {"droplet": state.droplet(state.record(int(m.group(1))))}
        if m := _DROPLET_ACTIONS.match(path):
            droplet_id = int(m.group(1))
            if method == "POST":
                return 201, {"action": state.start_action(droplet_id, self._body())}
            if method == "GET":
                state.record(droplet_id)
                with state.lock:
                    acts = [
                        a.to_json() for a in state.actions.values() if a.droplet_id == droplet_id
                    ]
                chunk, links = paginate(acts, base, path, query, state.max_per_page)
                return 200, {"actions": chunk, "links": links, "meta": {"total": len(acts)}}
        if method == "GET" and (m := _DROPLET_ACTION.match(path)):
            state.record(int(m.group(1)))
            with state.lock:
                act = state.actions.get(int(m.group(2)))
                if act is None or act.droplet_id != int(m.group(1)):
                    raise ApiError(404, "not_found", NOT_FOUND)
                return 200, {"action": act.to_json()}
        if method == "GET" and (m := _ACTION.match(path)):
            with state.lock:
                act = state.actions.get(int(m.group(1)))
                if act is None:
                    raise ApiError(404, "not_found", NOT_FOUND)
                return 200, {"action": act.to_json()}
        if method == "GET" and (m := _DROPLET_SNAPSHOTS.match(path)):
            droplet_id = int(m.group(1))
            state.record(droplet_id)
            with state.lock:
                snaps = [
                    s.droplet_json() for s in state.snapshots.values() if s.droplet_id == droplet_id
                ]
            chunk, links = paginate(snaps, base, path, query, state.max_per_page)
            return 200, {"snapshots": chunk, "links": links, "meta": {"total": len(snaps)}}
        if method == "GET" and path == "/v2/snapshots":
            kind = _param(query, "resource_type")
            with state.lock:
                snaps = [s.snapshots_json() for s in state.snapshots.values()]
            if kind not in (None, "droplet"):
                snaps = []  # the emulator has no volume snapshots
            chunk, links = paginate(snaps, base, path, query, state.max_per_page)
            return 200, {"snapshots": chunk, "links": links, "meta": {"total": len(snaps)}}
        raise ApiError(404, "not_found", NOT_FOUND)

    def _cloud_route(
        self, method: str, path: str, query: Mapping[str, list[str]]
    ) -> tuple[int, dict[str, Any] | None]:
        """Tags, firewalls and load balancers."""
        state = self.server.state
        if path == "/v2/tags" and method in ("GET", "POST"):
            if method == "POST":
                return 201, {"tag": state.create_tag(self._body())}
            return 200, self._page("tags", [state.tag(n) for n in state.tag_names()], path, query)
        if m := _TAG_RESOURCES.match(path):
            if method in ("POST", "DELETE"):
                add = method == "POST"
                state.tag_resources(unquote(m.group(1)), self._body(), add=add)
                return 204, None
        elif m := _TAG.match(path):
            if method == "GET":
                return 200, {"tag": state.tag(unquote(m.group(1)))}
            if method == "DELETE":
                state.delete_tag(unquote(m.group(1)))
                return 204, None
        if path == "/v2/firewalls":
            if method == "POST":
                return 202, {"firewall": state.put_firewall(self._body())}
            if method == "GET":
                with state.lock:
                    ids = list(state.firewalls)
                fws = [state.firewall(i) for i in ids]
                return 200, self._page("firewalls", fws, path, query)
        elif m := _FIREWALL.match(path):
            fw_id = unquote(m.group(1))
            if method == "GET":
                return 200, {"firewall": state.firewall(fw_id)}
            if method == "PUT":
                return 200, {"firewall": state.put_firewall(self._body(), fw_id)}
            if method == "DELETE":
                state.delete_firewall(fw_id)
                return 204, None
        if path == "/v2/load_balancers":
            if method == "POST":
                return 202, {"load_balancer": state.put_load_balancer(self._body())}
            if method == "GET":
                lbs = state.load_balancer_list()
                return 200, self._page("load_balancers", lbs, path, query)
        elif m := _LOAD_BALANCER.match(path):
            lb_id = unquote(m.group(1))
            if method == "GET":
                return 200, {"load_balancer": state.load_balancer(lb_id)}
            if method == "PUT":
                return 200, {"load_balancer": state.put_load_balancer(self._body(), lb_id)}
            if method == "DELETE":
                state.delete_load_balancer(lb_id)
                return 204, None
        raise ApiError(404, "not_found", NOT_FOUND)

    def _page(self, key: str, items: list[Any], path: str,
              query: Mapping[str, list[str]]) -> dict[str, Any]:
        state = self.server.state
        chunk, links = paginate(items, base_url(self.server), path, query, state.max_per_page)
        return {key: chunk, "links": links, "meta": {"total": len(items)}}

    def _list_droplets(
        self, base: str, path: str, query: Mapping[str, list[str]]
    ) -> dict[str, Any]:
        state = self.server.state
        tag = _param(query, "tag_name")
        kind = _param(query, "type")
        name = _param(query, "name")
        if tag is not None and (kind is not None or name is not None):
            # The spec: tag_name "Can not be combined with `name` or `type`". Being strict here
            # keeps the client honest: it must never rely on the combination.
            raise ApiError(
                422, "unprocessable_entity", "tag_name can not be combined with name or type."
            )
        if kind not in (None, "droplets", "gpus"):
            raise ApiError(400, "bad_request", "type must be one of droplets, gpus")
        records = state.records()
        if tag is not None:
            # The GPU caveat ("By default, only non-GPU Droplets are returned. To list only GPU
            # Droplets, set type=gpus ... Can not be combined with tag_name") is ambiguous about
            # tag filtering; SkyPilot lists its GPU clusters by tag_name alone, so a tag filter
            # returns tagged droplets of ANY kind here. Our client does not depend on that
            # choice: it also lists type=gpus and filters tags itself.
            records = [r for r in records if tag in (r.get("tags") or [])]
            if not state.tag_filter_includes_gpus:
                records = [r for r in records if not is_gpu(r)]
        elif kind == "gpus":
            records = [r for r in records if is_gpu(r)]
        else:
            records = [r for r in records if not is_gpu(r)]
        if name is not None:
            records = [r for r in records if str(r["droplet_name"]).lower() == name.lower()]
        chunk, links = paginate(records, base, path, query, state.max_per_page)
        return {
            "droplets": [state.droplet(r) for r in chunk],
            "links": links,
            "meta": {"total": len(records)},
        }


def make_server(
    host: str,
    port: int,
    token: str,
    droplets_source: DropletsSource,
    hooks: Hooks | None = None,
    **state_options: Any,
) -> EmulatorServer:
    """A ready (not yet serving) emulator bound to ``host:port`` (port 0 picks a free one).

    ``droplets_source``: the path of lab.json, a list of host records in lab.json's format, or
    a callable returning such a list. ``state_options`` go to ``EmulatorState`` (e.g.
    ``ratelimit_next``, ``retry_after``, ``action_delay``, ``network``). Serve with ``serve_forever()`` or
    ``start_background()``; stop with ``close()``.
    """
    server = EmulatorServer((host, port), _Handler)
    server.state = EmulatorState(token, droplets_source, hooks, **state_options)
    server.state.start_reconciler()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Lab stand-in for the DigitalOcean API (not DigitalOcean)."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--lab-json", required=True, help="the lab's lab.json")
    parser.add_argument(
        "--token-env",
        default="DIGITALOCEAN_TOKEN",
        help="environment variable holding the token clients must send (default %(default)s)",
    )
    args = parser.parse_args(argv)
    token = os.environ.get(args.token_env, "")
    if not token:
        parser.error(f"set {args.token_env}")
    server = make_server(args.host, args.port, token, args.lab_json)
    print(base_url(server), flush=True)
    return serve_until_interrupted(server)


if __name__ == "__main__":
    raise SystemExit(main())
