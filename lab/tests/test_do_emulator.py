"""The lab's DigitalOcean API emulator: JSON shapes, the GPU caveat, pagination, auth, rate
limiting, actions and hooks, snapshots, lab.json reloading."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpufleet.model import gpus as gpu_catalog
from gpufleet_lab import cloudnet, hosts
from gpufleet_lab.do_emulator import (
    PROFILES,
    SIZES,
    EmulatorServer,
    Hooks,
    base_url,
    droplet_json,
    make_server,
)

TOKEN = "emulator-test-token"
Response = tuple[int, dict[str, str], dict[str, Any]]


def host(
    i: int,
    *,
    profile: str = "h100",
    tags: tuple[str, ...] = ("llama3",),
    public: bool = True,
    private: bool = True,
    size: str | None = None,
) -> dict[str, Any]:
    return {
        "index": i,
        "machine": f"gfh{i}",
        "droplet_name": f"llama3-gpu-{i:02d}",
        "droplet_id": 400000 + i,
        "profile": profile,
        "flavour": "docker",
        "public_ip": f"10.213.0.{10 + i}" if public else None,
        "private_ip": f"10.213.100.{10 + i}" if private else None,
        "region": "tor1",
        "size": size,
        "tags": list(tags),
    }


@pytest.fixture
def emulator() -> Iterator[Callable[..., EmulatorServer]]:
    servers: list[EmulatorServer] = []

    def start(source: Any, hooks: Hooks | None = None, **options: Any) -> EmulatorServer:
        server = make_server("127.0.0.1", 0, TOKEN, source, hooks, **options)
        server.start_background()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def call(
    server: EmulatorServer,
    method: str,
    path: str,
    body: Any = None,
    token: str | None = TOKEN,
) -> Response:
    url = path if path.startswith("http") else base_url(server) + path
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read() or b"{}")


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


# --- auth ------------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x"])
def test_requests_without_the_token_get_401(emulator, token) -> None:
    server = emulator([host(1)])
    status, _, body = call(server, "GET", "/v2/droplets?tag_name=llama3", token=token)
    assert status == 401
    assert body == {"id": "unauthorized", "message": "Unable to authenticate you"}


def test_lab_knobs_need_the_token_too(emulator) -> None:
    server = emulator([host(1)])
    assert call(server, "POST", "/_lab/ratelimit", {"count": 5}, token="nope")[0] == 401
    assert server.state.ratelimit_next == 0


# --- droplet JSON -----------------------------------------------------------------------------


def test_droplet_has_the_api_shape(emulator) -> None:
    server = emulator([host(1)])
    status, headers, body = call(server, "GET", "/v2/droplets/400001")
    assert status == 200
    d = body["droplet"]
    for key in (
        "id",
        "name",
        "memory",
        "vcpus",
        "disk",
        "status",
        "created_at",
        "region",
        "size",
        "size_slug",
        "image",
        "networks",
        "tags",
        "gpu_info",
    ):
        assert key in d, key
    assert d["id"] == 400001 and d["name"] == "llama3-gpu-01" and d["status"] == "active"
    assert d["region"] == {**d["region"], "slug": "tor1", "name": "Toronto 1"}
    assert d["size_slug"] == d["size"]["slug"] == "gpu-h100x1-80gb"
    gpu = {"count": 1, "vram": {"amount": 80, "unit": "gib"}, "model": "nvidia_h100"}
    assert d["size"]["gpu_info"] == gpu and d["gpu_info"] == gpu
    assert d["image"]["slug"] == "gpu-h100x1-base" and d["image"]["distribution"] == "Ubuntu"
    assert isinstance(d["image"]["id"], int)
    assert d["networks"]["v6"] == []
    v4 = {n["type"]: n for n in d["networks"]["v4"]}
    assert v4["public"] == {
        "ip_address": "10.213.0.11",
        "netmask": "255.255.255.0",
        "gateway": "10.213.0.1",
        "type": "public",
    }
    assert v4["private"]["ip_address"] == "10.213.100.11"
    assert headers["ratelimit-limit"] == "5000"
    assert "ratelimit-remaining" in headers and "ratelimit-reset" in headers


def test_droplet_without_a_private_address_lists_only_public() -> None:
    d = droplet_json(host(1, private=False))
    assert [n["type"] for n in d["networks"]["v4"]] == ["public"]


@pytest.mark.parametrize(
    ("profile", "slug", "gpus", "image"),
    [
        ("h100", "gpu-h100x1-80gb", 1, "gpu-h100x1-base"),
        ("h100x2", "gpu-h100x2-160gb", 2, "gpu-h100x8-base"),
        ("rtx4000ada", "gpu-4000adax1-20gb", 1, "gpu-h100x1-base"),
        ("t4", "gpu-t4x1-16gb", 1, "gpu-h100x1-base"),
        ("nodriver", "gpu-h100x1-80gb", 1, "gpu-h100x1-base"),
        ("nogpu", "s-4vcpu-8gb", 0, "ubuntu-24-04-x64"),
    ],
)
def test_profiles_map_to_sizes(profile, slug, gpus, image) -> None:
    d = droplet_json(host(1, profile=profile))
    assert d["size_slug"] == slug and d["image"]["slug"] == image
    if gpus:
        assert d["gpu_info"]["count"] == gpus == d["size"]["gpu_info"]["count"]
    else:
        assert "gpu_info" not in d and "gpu_info" not in d["size"]
    assert set(PROFILES) == {"h100", "h100x2", "rtx4000ada", "t4", "nodriver", "nogpu"}


def test_the_lab_size_slug_wins_over_the_profile() -> None:
    d = droplet_json(host(1, profile="h100", size="gpu-h100x8-640gb"))
    assert d["size_slug"] == "gpu-h100x8-640gb" and d["gpu_info"]["count"] == 8
    unknown = droplet_json(host(1, profile="rtx4000ada", size="gpu-h200x1-141gb"))
    assert unknown["size_slug"] == "gpu-h200x1-141gb"
    assert unknown["gpu_info"] == SIZES["gpu-4000adax1-20gb"].gpu_info()


def test_unknown_droplet_is_404(emulator) -> None:
    server = emulator([host(1)])
    status, _, body = call(server, "GET", "/v2/droplets/999")
    assert status == 404 and body["id"] == "not_found"


# --- listing: the GPU caveat and pagination ---------------------------------------------------


def _names(body: dict[str, Any]) -> list[str]:
    return [d["name"] for d in body["droplets"]]


def test_gpu_caveat(emulator) -> None:
    gpu, cpu = host(1), host(2, profile="nogpu")
    other_gpu = host(3, tags=("other",))
    server = emulator([gpu, cpu, other_gpu])
    # a plain listing leaves GPU droplets out
    assert _names(call(server, "GET", "/v2/droplets")[2]) == ["llama3-gpu-02"]
    assert _names(call(server, "GET", "/v2/droplets?type=droplets")[2]) == ["llama3-gpu-02"]
    # type=gpus lists only GPU droplets, whatever their tags
    assert _names(call(server, "GET", "/v2/droplets?type=gpus")[2]) == [
        "llama3-gpu-01",
        "llama3-gpu-03",
    ]
    # tag_name: tagged droplets of any kind (the documented choice)
    assert _names(call(server, "GET", "/v2/droplets?tag_name=llama3")[2]) == [
        "llama3-gpu-01",
        "llama3-gpu-02",
    ]
    # ... and it can not be combined with type
    status, _, body = call(server, "GET", "/v2/droplets?tag_name=llama3&type=gpus")
    assert status == 422 and body["id"] == "unprocessable_entity"


def test_strict_reading_of_the_caveat_is_available(emulator) -> None:
    server = emulator([host(1), host(2, profile="nogpu")], tag_filter_includes_gpus=False)
    assert _names(call(server, "GET", "/v2/droplets?tag_name=llama3")[2]) == ["llama3-gpu-02"]


def test_pagination_links_are_absolute_on_the_emulator(emulator) -> None:
    server = emulator([host(i) for i in range(1, 8)])
    base = base_url(server)
    status, _, page1 = call(server, "GET", "/v2/droplets?tag_name=llama3&per_page=3")
    assert status == 200 and len(page1["droplets"]) == 3 and page1["meta"]["total"] == 7
    pages = page1["links"]["pages"]
    assert set(pages) == {"next", "last"}
    assert pages["next"] == f"{base}/v2/droplets?tag_name=llama3&page=2&per_page=3"
    assert pages["last"] == f"{base}/v2/droplets?tag_name=llama3&page=3&per_page=3"
    page2 = call(server, "GET", pages["next"])[2]
    assert set(page2["links"]["pages"]) == {"first", "prev", "next", "last"}
    page3 = call(server, "GET", page2["links"]["pages"]["next"])[2]
    assert _names(page3) == ["llama3-gpu-07"]
    assert set(page3["links"]["pages"]) == {"first", "prev"}
    beyond = call(server, "GET", "/v2/droplets?tag_name=llama3&per_page=3&page=9")[2]
    assert beyond["droplets"] == [] and "next" not in beyond["links"]["pages"]


def test_sizes_carry_gpu_sizes_at_the_catalogue_list_prices(emulator) -> None:
    server = emulator([host(1)])
    status, _, body = call(server, "GET", "/v2/sizes?per_page=200")
    assert status == 200 and body["meta"]["total"] == len(SIZES) == len(body["sizes"])
    by_slug = {s["slug"]: s for s in body["sizes"]}
    # every catalogue size with a list price is there, at that price; the others are not listed
    for size in gpu_catalog.SIZES:
        if size.price_hourly is None:
            assert size.slug not in by_slug
            continue
        entry = by_slug[size.slug]
        assert entry["price_hourly"] == size.price_hourly
        assert entry["price_monthly"] == round(size.price_hourly * 672, 2)
        assert entry["gpu_info"]["count"] == size.gpu.count
        assert entry["regions"] and entry["available"] is True
    assert "gpu_info" not in by_slug["s-4vcpu-8gb"]
    # a droplet's size object is its /v2/sizes entry, in the droplet's region only
    droplet_size = call(server, "GET", "/v2/droplets/400001")[2]["droplet"]["size"]
    assert droplet_size == {**by_slug["gpu-h100x1-80gb"], "regions": ["tor1"]}


def test_sizes_the_account_cannot_buy_have_no_regions(emulator) -> None:
    server = emulator([], unavailable_sizes=["gpu-h100x8-640gb"], max_per_page=3)
    first = call(server, "GET", "/v2/sizes?per_page=200")[2]
    assert len(first["sizes"]) == 3 and "next" in first["links"]["pages"]
    entries = list(first["sizes"])
    url = first["links"]["pages"]["next"]
    while url:
        page = call(server, "GET", url)[2]
        entries += page["sizes"]
        url = page["links"]["pages"].get("next")
    h100x8 = next(s for s in entries if s["slug"] == "gpu-h100x8-640gb")
    assert h100x8["regions"] == [] and h100x8["available"] is False
    assert all(s["regions"] for s in entries if s["slug"] != "gpu-h100x8-640gb")


def test_per_page_defaults_to_20_and_is_capped_at_200(emulator) -> None:
    server = emulator([host(i) for i in range(1, 251)])
    assert len(call(server, "GET", "/v2/droplets?type=gpus")[2]["droplets"]) == 20
    body = call(server, "GET", "/v2/droplets?type=gpus&per_page=500")[2]
    assert len(body["droplets"]) == 200 and "per_page=200" in body["links"]["pages"]["next"]


def test_bad_paging_parameters_are_400(emulator) -> None:
    server = emulator([host(1)])
    assert call(server, "GET", "/v2/droplets?per_page=abc")[0] == 400
    assert call(server, "GET", "/v2/droplets?page=0")[0] == 400


def test_lab_json_is_reread_when_it_changes(emulator, tmp_path: Path) -> None:
    lab = tmp_path / "lab.json"
    lab.write_text(json.dumps({"hosts": [host(1)], "ports": {}}))
    server = emulator(lab)
    assert _names(call(server, "GET", "/v2/droplets?tag_name=llama3")[2]) == ["llama3-gpu-01"]
    lab.write_text(json.dumps({"hosts": [host(1), host(2)], "ports": {}}))
    st = lab.stat()
    os.utime(lab, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert _names(call(server, "GET", "/v2/droplets?tag_name=llama3")[2]) == [
        "llama3-gpu-01",
        "llama3-gpu-02",
    ]


def test_missing_lab_json_means_no_droplets(emulator, tmp_path: Path) -> None:
    server = emulator(tmp_path / "absent.json")
    body = call(server, "GET", "/v2/droplets?tag_name=llama3")[2]
    assert body["droplets"] == [] and body["meta"]["total"] == 0


# --- rate limiting and injected errors --------------------------------------------------------


def test_ratelimit_knob(emulator) -> None:
    server = emulator([host(1)])
    status, _, body = call(server, "POST", "/_lab/ratelimit", {"count": 2, "retry_after": 3})
    assert status == 200 and body["ratelimit_next"] == 2
    for _ in range(2):
        status, headers, body = call(server, "GET", "/v2/droplets?tag_name=llama3")
        assert status == 429
        assert body == {"id": "too_many_requests", "message": "API Rate limit exceeded."}
        assert headers["Retry-After"] == "3"
        assert headers["ratelimit-remaining"] == "0"
        assert abs(int(headers["ratelimit-reset"]) - (time.time() + 3)) < 5
    assert call(server, "GET", "/v2/droplets?tag_name=llama3")[0] == 200


def test_ratelimit_from_the_constructor(emulator) -> None:
    server = emulator([host(1)], ratelimit_next=1)
    assert call(server, "GET", "/v2/droplets/400001")[0] == 429
    assert call(server, "GET", "/v2/droplets/400001")[0] == 200


def test_error_knob(emulator) -> None:
    server = emulator([host(1)])
    assert call(server, "POST", "/_lab/errors", {"count": 1, "status": 502})[0] == 200
    assert call(server, "GET", "/v2/droplets/400001")[0] == 502
    assert call(server, "GET", "/v2/droplets/400001")[0] == 200
    assert call(server, "POST", "/_lab/errors", {"count": 1, "status": 404})[0] == 400


# --- actions ----------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.gate = threading.Event()
        self.gate.set()

    def hooks(self) -> Hooks:
        def record(name: str) -> Callable[..., None]:
            def hook(droplet: dict[str, Any], *args: Any) -> None:
                assert self.gate.wait(10)
                self.calls.append((name, droplet["machine"], *args))

            return hook

        return Hooks(
            on_rebuild=record("rebuild"),
            on_power_cycle=record("power_cycle"),
            on_reboot=record("reboot"),
            on_snapshot=record("snapshot"),
            on_power_off=record("power_off"),
            on_power_on=record("power_on"),
            on_shutdown=record("shutdown"),
        )


def _action_status(server: EmulatorServer, action_id: int) -> str:
    return call(server, "GET", f"/v2/actions/{action_id}")[2]["action"]["status"]


def _is_completed(server: EmulatorServer, action_id: int) -> bool:
    return _action_status(server, action_id) == "completed"


def test_rebuild_action_runs_the_hook_and_completes(emulator) -> None:
    rec = Recorder()
    rec.gate.clear()
    server = emulator([host(1)], rec.hooks())
    status, _, body = call(
        server,
        "POST",
        "/v2/droplets/400001/actions",
        {"type": "rebuild", "image": "ubuntu-24-04-x64"},
    )
    assert status == 201
    action = body["action"]
    assert action["status"] == "in-progress" and action["type"] == "rebuild"
    assert action["completed_at"] is None and action["started_at"]
    assert action["resource_id"] == 400001 and action["resource_type"] == "droplet"
    assert action["region_slug"] == "tor1"
    # a second action while this one runs is refused, like the API does
    status, _, body = call(server, "POST", "/v2/droplets/400001/actions", {"type": "reboot"})
    assert status == 422 and body["message"] == "Droplet already has a pending event."
    rec.gate.set()
    wait_for(lambda: _action_status(server, action["id"]) == "completed")
    assert rec.calls == [("rebuild", "gfh1", "ubuntu-24-04-x64")]
    by_droplet = call(server, "GET", f"/v2/droplets/400001/actions/{action['id']}")[2]
    assert by_droplet["action"]["completed_at"] is not None
    droplet = call(server, "GET", "/v2/droplets/400001")[2]["droplet"]
    assert droplet["image"]["slug"] == "ubuntu-24-04-x64"
    listing = call(server, "GET", "/v2/droplets/400001/actions")[2]
    assert [a["id"] for a in listing["actions"]] == [action["id"]]


def test_a_failing_hook_makes_the_action_errored(emulator) -> None:
    def boom(droplet: dict[str, Any]) -> None:
        raise RuntimeError("machine gone")

    server = emulator([host(1)], Hooks(on_power_cycle=boom))
    action = call(server, "POST", "/v2/droplets/400001/actions", {"type": "power_cycle"})[2]
    wait_for(lambda: _action_status(server, action["action"]["id"]) == "errored")


def test_action_fault_knob_errors_without_touching_the_droplet(emulator) -> None:
    rec = Recorder()
    server = emulator([host(1)], rec.hooks())
    assert call(server, "POST", "/_lab/actions", {"count": 1, "outcome": "errored",
                                                  "hold": 0.3})[0] == 200
    action = call(server, "POST", "/v2/droplets/400001/actions",
                  {"type": "rebuild", "image": "ubuntu-24-04-x64"})[2]["action"]
    assert _action_status(server, action["id"]) == "in-progress"  # held
    wait_for(lambda: _action_status(server, action["id"]) == "errored")
    assert rec.calls == []
    # only the next N actions: the one after runs
    action = call(server, "POST", "/v2/droplets/400001/actions", {"type": "reboot"})[2]["action"]
    wait_for(functools.partial(_is_completed, server, action["id"]))
    assert [c[0] for c in rec.calls] == ["reboot"]
    assert call(server, "POST", "/_lab/actions", {"outcome": "explode"})[0] == 400


def test_action_fault_knob_no_boot_rebuilds_then_powers_off(emulator) -> None:
    rec = Recorder()
    server = emulator([host(1)], rec.hooks())
    call(server, "POST", "/_lab/actions", {"outcome": "no_boot"})
    action = call(server, "POST", "/v2/droplets/400001/actions",
                  {"type": "rebuild", "image": "ubuntu-24-04-x64"})[2]["action"]
    wait_for(functools.partial(_is_completed, server, action["id"]))
    assert [c[0] for c in rec.calls] == ["rebuild", "power_off"]
    # the hypervisor says active: the API cannot tell that the system never booted
    assert call(server, "GET", "/v2/droplets/400001")[2]["droplet"]["status"] == "active"


def test_power_actions_change_the_status(emulator) -> None:
    rec = Recorder()
    server = emulator([host(1)], rec.hooks())
    for kind, expected in (
        ("power_off", "off"),
        ("power_on", "active"),
        ("shutdown", "off"),
        ("power_cycle", "active"),
        ("reboot", "active"),
    ):
        action = call(server, "POST", "/v2/droplets/400001/actions", {"type": kind})[2]["action"]
        wait_for(functools.partial(_is_completed, server, action["id"]))
        assert call(server, "GET", "/v2/droplets/400001")[2]["droplet"]["status"] == expected
    assert [c[0] for c in rec.calls] == [
        "power_off",
        "power_on",
        "shutdown",
        "power_cycle",
        "reboot",
    ]


@pytest.mark.parametrize(
    "body",
    [{"type": "explode"}, {"type": "rebuild"}, {"type": "rebuild", "image": "no-such-image"}],
)
def test_bad_actions_are_422(emulator, body) -> None:
    server = emulator([host(1)])
    status, _, reply = call(server, "POST", "/v2/droplets/400001/actions", body)
    assert status == 422 and reply["id"] == "unprocessable_entity"


def test_action_on_unknown_droplet_is_404(emulator) -> None:
    server = emulator([host(1)])
    assert call(server, "POST", "/v2/droplets/7/actions", {"type": "reboot"})[0] == 404
    assert call(server, "GET", "/v2/actions/12345")[0] == 404


def test_snapshot_then_rebuild_from_it(emulator) -> None:
    rec = Recorder()
    server = emulator([host(1), host(2)], rec.hooks())
    action = call(
        server,
        "POST",
        "/v2/droplets/400001/actions",
        {"type": "snapshot", "name": "before-upgrade"},
    )[2]["action"]
    wait_for(lambda: _action_status(server, action["id"]) == "completed")
    snaps = call(server, "GET", "/v2/droplets/400001/snapshots")[2]
    assert snaps["meta"]["total"] == 1
    snap = snaps["snapshots"][0]
    assert isinstance(snap["id"], int) and snap["name"] == "before-upgrade"
    assert snap["type"] == "snapshot" and snap["regions"] == ["tor1"]
    assert call(server, "GET", "/v2/droplets/400002/snapshots")[2]["snapshots"] == []
    everything = call(server, "GET", "/v2/snapshots?resource_type=droplet")[2]["snapshots"]
    assert everything == [
        {
            **everything[0],
            "id": str(snap["id"]),
            "resource_id": "400001",
            "resource_type": "droplet",
            "name": "before-upgrade",
        }
    ]
    assert call(server, "GET", "/v2/snapshots?resource_type=volume")[2]["snapshots"] == []
    droplet = call(server, "GET", "/v2/droplets/400001")[2]["droplet"]
    assert droplet["snapshot_ids"] == [snap["id"]]
    rebuild = call(
        server, "POST", "/v2/droplets/400002/actions", {"type": "rebuild", "image": snap["id"]}
    )[2]["action"]
    wait_for(lambda: _action_status(server, rebuild["id"]) == "completed")
    image = call(server, "GET", "/v2/droplets/400002")[2]["droplet"]["image"]
    assert image["id"] == snap["id"] and image["type"] == "snapshot"
    assert rec.calls == [("snapshot", "gfh1", "before-upgrade", snap["id"]),
                         ("rebuild", "gfh2", snap["id"])]


def test_a_snapshot_hook_gets_the_new_id_and_gives_the_size(emulator) -> None:
    seen: list[tuple[str, int]] = []

    def copy_disk(droplet: dict[str, Any], name: str, snapshot_id: int) -> int:
        seen.append((name, snapshot_id))
        return 2_860_000_000

    server = emulator([host(1)], Hooks(on_snapshot=copy_disk))
    action = call(server, "POST", "/v2/droplets/400001/actions",
                  {"type": "snapshot", "name": "gold"})[2]["action"]
    wait_for(lambda: _action_status(server, action["id"]) == "completed")
    snap = call(server, "GET", "/v2/droplets/400001/snapshots")[2]["snapshots"][0]
    assert seen == [("gold", snap["id"])] and snap["size_gigabytes"] == 2.86


# --- tags ------------------------------------------------------------------------------------


def _tag(server: EmulatorServer, tag: str, ids: list[int], method: str = "POST") -> int:
    body = {"resources": [{"resource_id": str(i), "resource_type": "droplet"} for i in ids]}
    return call(server, method, f"/v2/tags/{tag}/resources", body)[0]


def test_tags_create_is_idempotent_and_counts_droplets(emulator) -> None:
    server = emulator([host(1), host(2)])
    status, _, body = call(server, "POST", "/v2/tags", {"name": "web"})
    assert status == 201
    assert body["tag"]["name"] == "web"
    assert body["tag"]["resources"]["count"] == 0
    assert body["tag"]["resources"]["droplets"] == {"count": 0, "last_tagged_uri": ""}
    assert call(server, "POST", "/v2/tags", {"name": "web"})[0] == 201
    assert _tag(server, "web", [400001]) == 204
    status, _, body = call(server, "GET", "/v2/tags/web")
    assert status == 200 and body["tag"]["resources"]["droplets"]["count"] == 1
    assert call(server, "GET", "/v2/tags/llama3")[2]["tag"]["resources"]["count"] == 2
    names = [t["name"] for t in call(server, "GET", "/v2/tags")[2]["tags"]]
    assert names == ["web", "llama3"]


def test_tag_changes_show_in_droplets_and_tag_listings(emulator) -> None:
    server = emulator([host(1), host(2)])
    call(server, "POST", "/v2/tags", {"name": "web"})
    _tag(server, "web", [400002])
    _tag(server, "llama3", [400001], "DELETE")
    assert call(server, "GET", "/v2/droplets/400002")[2]["droplet"]["tags"] == ["llama3", "web"]
    assert call(server, "GET", "/v2/droplets/400001")[2]["droplet"]["tags"] == []
    assert _names(call(server, "GET", "/v2/droplets?tag_name=web")[2]) == ["llama3-gpu-02"]
    assert _names(call(server, "GET", "/v2/droplets?tag_name=llama3")[2]) == ["llama3-gpu-02"]
    _tag(server, "llama3", [400001])
    assert call(server, "GET", "/v2/droplets/400001")[2]["droplet"]["tags"] == ["llama3"]


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v2/tags", {"name": "bad name"}, 422),
        ("/v2/tags", {}, 422),
        ("/v2/tags/nosuch/resources",
         {"resources": [{"resource_id": "400001", "resource_type": "droplet"}]}, 404),
        ("/v2/tags/llama3/resources",
         {"resources": [{"resource_id": "999", "resource_type": "droplet"}]}, 404),
        ("/v2/tags/llama3/resources", {"resources": []}, 422),
    ],
)
def test_bad_tag_requests(emulator, path, body, status) -> None:
    server = emulator([host(1)])
    got, _, err = call(server, "POST", path, body)
    assert got == status
    assert set(err) == {"id", "message"}


def test_unknown_tag_is_404_and_delete_untags(emulator) -> None:
    server = emulator([host(1)])
    assert call(server, "GET", "/v2/tags/nosuch")[0] == 404
    assert call(server, "DELETE", "/v2/tags/llama3")[0] == 204
    assert call(server, "GET", "/v2/droplets/400001")[2]["droplet"]["tags"] == []
    assert call(server, "GET", "/v2/tags/llama3")[0] == 404


# --- firewalls and load balancers: the API ---------------------------------------------------


class RecordingNetwork(cloudnet.NullNetwork):
    """The network as a recorder: every plan applied, health as a test sets it."""

    def __init__(self) -> None:
        super().__init__("10.213.0")
        self.plans: list[cloudnet.NetworkPlan] = []
        self.fail = False

    def apply(self, plan: cloudnet.NetworkPlan) -> None:
        if self.fail:
            raise RuntimeError("lab: injected network failure")
        super().apply(plan)
        self.plans.append(plan)


FIREWALL = {
    "name": "fw-web",
    "inbound_rules": [
        {"protocol": "tcp", "ports": "22", "sources": {"addresses": ["192.0.2.0/24"]}},
        {"protocol": "tcp", "ports": "8000-8010", "sources": {"tags": ["web"]}},
        {"protocol": "icmp", "sources": {"addresses": ["0.0.0.0/0", "::/0"]}},
    ],
    "outbound_rules": [
        {"protocol": "tcp", "ports": "all", "destinations": {"addresses": ["0.0.0.0/0"]}},
    ],
    "droplet_ids": [400001],
    "tags": [],
}

LB = {
    "name": "lb-web",
    "region": "tor1",
    "forwarding_rules": [
        {"entry_protocol": "http", "entry_port": 80, "target_protocol": "http",
         "target_port": 8000},
    ],
    "health_check": {"protocol": "http", "port": 8000, "path": "/health"},
    "tag": "web",
}


def _net_server(emulator, *hosts_: dict[str, Any]) -> tuple[EmulatorServer, RecordingNetwork]:
    network = RecordingNetwork()
    server = emulator(list(hosts_ or (host(1), host(2))), network=network)
    return server, network


def test_firewall_create_get_list_put_delete(emulator) -> None:
    server, _ = _net_server(emulator)
    status, _, body = call(server, "POST", "/v2/firewalls", FIREWALL)
    assert status == 202
    fw = body["firewall"]
    assert list(fw) == ["id", "name", "status", "created_at", "pending_changes", "inbound_rules",
                        "outbound_rules", "droplet_ids", "tags"]
    assert fw["status"] == "waiting" and fw["pending_changes"] == []
    assert fw["inbound_rules"][2] == {"protocol": "icmp", "ports": "0",
                                      "sources": {"addresses": ["0.0.0.0/0", "::/0"]}}
    wait_for(lambda: call(server, "GET", f"/v2/firewalls/{fw['id']}")[2]["firewall"]["status"]
             == "succeeded")
    listing = call(server, "GET", "/v2/firewalls")[2]
    assert [f["id"] for f in listing["firewalls"]] == [fw["id"]] and listing["meta"]["total"] == 1
    status, _, body = call(server, "PUT", f"/v2/firewalls/{fw['id']}",
                           {**FIREWALL, "name": "fw-2", "droplet_ids": [], "tags": ["web"]})
    assert status == 200
    assert body["firewall"]["name"] == "fw-2" and body["firewall"]["droplet_ids"] == []
    assert call(server, "DELETE", f"/v2/firewalls/{fw['id']}")[0] == 204
    assert call(server, "GET", f"/v2/firewalls/{fw['id']}")[0] == 404
    assert call(server, "PUT", f"/v2/firewalls/{fw['id']}", FIREWALL)[0] == 404


@pytest.mark.parametrize(
    ("change", "status"),
    [
        ({"name": ""}, 422),
        ({"name": "-bad"}, 422),
        ({"inbound_rules": [{"protocol": "sctp", "ports": "22",
                             "sources": {"addresses": ["0.0.0.0/0"]}}]}, 422),
        ({"inbound_rules": [{"protocol": "tcp", "ports": "22-", "sources": {"tags": ["a"]}}]},
         422),
        ({"inbound_rules": [{"protocol": "tcp", "ports": "70000",
                             "sources": {"tags": ["a"]}}]}, 422),
        ({"inbound_rules": [{"protocol": "tcp", "sources": {"tags": ["a"]}}]}, 422),
        ({"inbound_rules": [{"protocol": "icmp", "ports": "22", "sources": {"tags": ["a"]}}]},
         422),
        ({"inbound_rules": [{"protocol": "tcp", "ports": "22", "sources": {}}]}, 422),
        ({"inbound_rules": [{"protocol": "tcp", "ports": "22",
                             "sources": {"addresses": []}}]}, 422),
        ({"inbound_rules": [{"protocol": "tcp", "ports": "22",
                             "sources": {"addresses": ["10.0.0.300"]}}]}, 422),
        ({"outbound_rules": [{"protocol": "tcp", "ports": "22",
                              "sources": {"addresses": ["0.0.0.0/0"]}}]}, 422),
        ({"droplet_ids": [999]}, 404),
        ({"inbound_rules": [{"protocol": "tcp", "ports": "22",
                             "sources": {"load_balancer_uids": ["nope"]}}]}, 404),
    ],
)
def test_bad_firewalls_are_refused(emulator, change, status) -> None:
    server, _ = _net_server(emulator)
    got, _, err = call(server, "POST", "/v2/firewalls", {**FIREWALL, **change})
    assert got == status, err
    assert err["id"] == ("not_found" if status == 404 else "unprocessable_entity")
    assert err["message"]


def test_load_balancer_shape_and_lifecycle(emulator) -> None:
    server, _ = _net_server(emulator)
    call(server, "POST", "/v2/tags", {"name": "web"})
    _tag(server, "web", [400002])
    status, _, body = call(server, "POST", "/v2/load_balancers", LB)
    assert status == 202
    lb = body["load_balancer"]
    assert lb["status"] == "new" and lb["ip"] == ""
    assert lb["region"]["slug"] == "tor1" and lb["size_unit"] == 1
    assert lb["forwarding_rules"] == [{
        "entry_protocol": "http", "entry_port": 80, "target_protocol": "http",
        "target_port": 8000, "certificate_id": "", "tls_passthrough": False}]
    assert lb["health_check"] == {
        "protocol": "http", "port": 8000, "path": "/health", "check_interval_seconds": 10,
        "response_timeout_seconds": 5, "healthy_threshold": 3, "unhealthy_threshold": 5}
    assert lb["sticky_sessions"] == {"type": "none"}
    assert lb["http_idle_timeout_seconds"] == 60 and lb["network"] == "EXTERNAL"
    assert lb["tag"] == "web" and lb["droplet_ids"] == [400002]
    assert not lb["redirect_http_to_https"] and not lb["enable_proxy_protocol"]
    assert not lb["enable_backend_keepalive"] and lb["vpc_uuid"]

    def active() -> bool:
        return call(server, "GET", f"/v2/load_balancers/{lb['id']}")[2]["load_balancer"][
            "status"] == "active"

    wait_for(active)
    got = call(server, "GET", f"/v2/load_balancers/{lb['id']}")[2]["load_balancer"]
    assert got["ip"] == "10.213.0.201"
    assert [x["id"] for x in call(server, "GET", "/v2/load_balancers")[2]["load_balancers"]] == [
        lb["id"]]
    status, _, body = call(server, "PUT", f"/v2/load_balancers/{lb['id']}",
                           {**LB, "tag": "", "droplet_ids": [400001],
                            "http_idle_timeout_seconds": 600})
    assert status == 200
    assert body["load_balancer"]["droplet_ids"] == [400001]
    assert body["load_balancer"]["http_idle_timeout_seconds"] == 600
    assert call(server, "DELETE", f"/v2/load_balancers/{lb['id']}")[0] == 204
    assert call(server, "GET", f"/v2/load_balancers/{lb['id']}")[0] == 404


@pytest.mark.parametrize(
    "change",
    [
        {"tag": "", "droplet_ids": []},
        {"droplet_ids": [400001]},
        {"region": "mars1"},
        {"forwarding_rules": []},
        {"forwarding_rules": [{"entry_protocol": "udp", "entry_port": 53,
                               "target_protocol": "udp", "target_port": 53}]},
        {"forwarding_rules": [{"entry_protocol": "https", "entry_port": 443,
                               "target_protocol": "http", "target_port": 8000}]},
        {"forwarding_rules": [{"entry_protocol": "http", "entry_port": 0,
                               "target_protocol": "http", "target_port": 8000}]},
        {"health_check": {"check_interval_seconds": 2}},
        {"health_check": {"check_interval_seconds": 301}},
        {"health_check": {"response_timeout_seconds": 2}},
        {"health_check": {"healthy_threshold": 1}},
        {"health_check": {"unhealthy_threshold": 11}},
        {"health_check": {"protocol": "grpc"}},
        {"http_idle_timeout_seconds": 29},
        {"http_idle_timeout_seconds": 601},
        {"sticky_sessions": {"type": "cookies"}},
    ],
)
def test_bad_load_balancers_are_422(emulator, change) -> None:
    server, _ = _net_server(emulator)
    got, _, err = call(server, "POST", "/v2/load_balancers", {**LB, **change})
    assert got == 422, err
    assert err["id"] == "unprocessable_entity" and err["message"]


def test_load_balancer_members_follow_the_tag(emulator) -> None:
    server, network = _net_server(emulator)
    call(server, "POST", "/v2/tags", {"name": "web"})
    _tag(server, "web", [400001])
    lb = call(server, "POST", "/v2/load_balancers", LB)[2]["load_balancer"]

    def members() -> list[tuple[int, str]]:
        specs = network.plan.lbs
        return [(m.droplet_id, m.address) for m in specs[0].members] if specs else []

    wait_for(lambda: members() == [(400001, "10.213.100.11")])
    _tag(server, "web", [400002])
    wait_for(lambda: members() == [(400001, "10.213.100.11"), (400002, "10.213.100.12")],
             timeout=1.5)
    _tag(server, "web", [400001], "DELETE")
    wait_for(lambda: members() == [(400002, "10.213.100.12")], timeout=1.5)
    status, _, body = call(server, "GET", f"/_lab/load_balancers/{lb['id']}/backends")
    assert status == 200
    assert body == {"backends": [
        {"droplet_id": 400002, "address": "10.213.100.12", "status": "healthy"}]}
    assert call(server, "GET", f"/lab/load_balancers/{lb['id']}/backends")[0] == 200
    assert call(server, "GET", f"/_lab/load_balancers/{lb['id']}/backends", token="x")[0] == 401
    assert call(server, "GET", "/_lab/load_balancers/nope/backends")[0] == 404
    spec = network.plan.lbs[0]
    assert (spec.slot, spec.public_ip, spec.private_ip) == (1, "10.213.0.201", "10.213.100.201")
    assert spec.health_check.path == "/health" and spec.idle_timeout == 60


def test_firewall_plan_follows_tags_and_load_balancers(emulator) -> None:
    server, network = _net_server(emulator)
    call(server, "POST", "/v2/tags", {"name": "web"})
    lb = call(server, "POST", "/v2/load_balancers", LB)[2]["load_balancer"]
    fw = {
        "name": "fw-8000",
        "inbound_rules": [
            {"protocol": "tcp", "ports": "8000",
             "sources": {"load_balancer_uids": [lb["id"]], "tags": ["web"]}},
        ],
        "outbound_rules": [],
        "tags": ["web"],
    }
    call(server, "POST", "/v2/firewalls", fw)
    wait_for(lambda: network.plan.firewalls == {"gfh1": None, "gfh2": None})
    _tag(server, "web", [400002])
    lb_allows = (cloudnet.Allow("tcp", "8000", "10.213.0.201/32"),
                 cloudnet.Allow("tcp", "8000", "10.213.100.201/32"))
    host2 = (cloudnet.Allow("tcp", "8000", "10.213.0.12/32"),
             cloudnet.Allow("tcp", "8000", "10.213.100.12/32"))
    wait_for(lambda: network.plan.firewalls.get("gfh2") == cloudnet.HostFirewall(
        host2 + lb_allows, ()), timeout=1.5)
    assert network.plan.firewalls["gfh1"] is None


def test_a_failing_network_leaves_firewalls_waiting(emulator) -> None:
    server, network = _net_server(emulator)
    network.fail = True
    fw = call(server, "POST", "/v2/firewalls", FIREWALL)[2]["firewall"]
    time.sleep(0.3)
    assert call(server, "GET", f"/v2/firewalls/{fw['id']}")[2]["firewall"]["status"] == "waiting"
    network.fail = False
    wait_for(lambda: call(server, "GET", f"/v2/firewalls/{fw['id']}")[2]["firewall"]["status"]
             == "succeeded")


def test_closing_the_emulator_closes_the_network(emulator) -> None:
    network = RecordingNetwork()
    server = make_server("127.0.0.1", 0, TOKEN, [host(1)], network=network)
    server.start_background()
    call(server, "POST", "/v2/tags", {"name": "web"})
    call(server, "POST", "/v2/load_balancers", LB)
    wait_for(lambda: bool(network.plan.lbs))
    server.close()
    assert network.plan == cloudnet.NetworkPlan()


# --- the generated iptables and HAProxy configuration (pure) ---------------------------------


def test_iptables_restore_text() -> None:
    fw = cloudnet.HostFirewall(
        inbound=(cloudnet.Allow("tcp", "22", "192.0.2.0/24"),
                 cloudnet.Allow("tcp", "8000-8010", "10.0.0.1/32"),
                 cloudnet.Allow("icmp", "0", "0.0.0.0/0")),
        outbound=(cloudnet.Allow("udp", "0", "0.0.0.0/0"),),
    )
    assert cloudnet.iptables_restore_text(fw, hook=True).splitlines() == [
        "*mangle",
        ":GPUFLEET-DOFW-IN - [0:0]",
        ":GPUFLEET-DOFW-OUT - [0:0]",
        "-A PREROUTING -i eth0 -j GPUFLEET-DOFW-IN",
        "-A POSTROUTING -o eth0 -j GPUFLEET-DOFW-OUT",
        "-A GPUFLEET-DOFW-IN -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN",
        "-A GPUFLEET-DOFW-IN -s 192.0.2.0/24 -p tcp -m tcp --dport 22 -j RETURN",
        "-A GPUFLEET-DOFW-IN -s 10.0.0.1/32 -p tcp -m tcp --dport 8000:8010 -j RETURN",
        "-A GPUFLEET-DOFW-IN -s 0.0.0.0/0 -p icmp -j RETURN",
        "-A GPUFLEET-DOFW-IN -j DROP",
        "-A GPUFLEET-DOFW-OUT -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN",
        "-A GPUFLEET-DOFW-OUT -d 0.0.0.0/0 -p udp -j RETURN",
        "-A GPUFLEET-DOFW-OUT -j DROP",
        "COMMIT",
    ]
    assert "PREROUTING" not in cloudnet.iptables_restore_text(fw, hook=False)
    remove = cloudnet.iptables_remove_text().splitlines()
    assert remove[1:3] == ["-D PREROUTING -i eth0 -j GPUFLEET-DOFW-IN",
                           "-D POSTROUTING -o eth0 -j GPUFLEET-DOFW-OUT"]
    assert remove[-3:] == ["-X GPUFLEET-DOFW-IN", "-X GPUFLEET-DOFW-OUT", "COMMIT"]


def test_firewall_resolution_skips_ipv6_and_unions_firewalls() -> None:
    views = [cloudnet.HostView(1, "h1", frozenset({"web"}), ("10.0.0.11", "10.0.100.11")),
             cloudnet.HostView(2, "h2", frozenset(), ("10.0.0.12",))]
    fws = [
        {"droplet_ids": [2], "tags": [], "outbound_rules": [], "inbound_rules": [
            {"protocol": "tcp", "ports": "22", "sources": {"addresses": ["::/0", "10.9.0.0/16"]}},
        ]},
        {"droplet_ids": [], "tags": ["web"], "outbound_rules": [], "inbound_rules": [
            {"protocol": "udp", "ports": "all", "sources": {"droplet_ids": [2]}},
        ]},
    ]
    plan = cloudnet.resolve_firewalls(views, fws, {})
    assert plan == {
        "h1": cloudnet.HostFirewall((cloudnet.Allow("udp", "0", "10.0.0.12/32"),), ()),
        "h2": cloudnet.HostFirewall((cloudnet.Allow("tcp", "22", "10.9.0.0/16"),), ()),
    }


def _spec(**change: Any) -> cloudnet.LbSpec:
    base = {
        "id": "lb", "slot": 1, "public_ip": "10.213.0.201", "private_ip": "10.213.100.201",
        "forwarding_rules": (cloudnet.ForwardingRule("http", 80, "http", 8000),
                             cloudnet.ForwardingRule("https", 443, "https", 8443, True)),
        "health_check": cloudnet.HealthCheck("http", 8000, "/health", 3, 4, 2, 5),
        "idle_timeout": 120,
    }
    return cloudnet.LbSpec(**{**base, **change})


def test_haproxy_config() -> None:
    text = cloudnet.haproxy_config(_spec(), "/run/lb/admin.sock")
    assert "    stats socket /run/lb/admin.sock mode 600 level admin" in text
    for line in ("    timeout client 120s", "    timeout server 120s", "    timeout check 4s"):
        assert line in text.splitlines()
    sections = text.split("\n\n")
    assert sections[2].splitlines() == [
        "frontend fe0", "    mode http", "    bind :80", "    default_backend be0",
        "    option forwardfor"]
    assert sections[3].splitlines() == [
        "backend be0", "    mode http", "    balance roundrobin",
        "    option httpchk GET /health", "    http-check expect status 200"]
    assert sections[4].splitlines()[:3] == ["frontend fe1", "    mode tcp", "    bind :443"]
    tcp = cloudnet.haproxy_config(_spec(health_check=cloudnet.HealthCheck("tcp", 22, "")), "s")
    assert "httpchk" not in tcp


def test_new_servers_start_down_until_rise_checks_pass() -> None:
    spec = _spec(health_check=cloudnet.HealthCheck("https", 8443, "/health", 3, 4, 2, 5))
    cmds = cloudnet.add_server_commands(spec, cloudnet.Member(7, "10.213.100.11"))
    assert cmds[:5] == [
        "add server be0/d7 10.213.100.11:8000 check port 8443 inter 3s rise 2 fall 5 "
        "check-ssl verify none weight 0",
        "enable health be0/d7",
        "enable server be0/d7",
        "set server be0/d7 health down",
        "set weight be0/d7 1",
    ]
    assert cmds[5].startswith("add server be1/d7 10.213.100.11:8443 check port 8443")


def test_show_stat_parsing_and_backend_status() -> None:
    text = "# pxname,svname,qcur,qmax,scur,status\nbe0,d1,0,0,2,UP\nbe0,d2,0,0,0,DOWN 1/2\n\n"
    rows = cloudnet.parse_show_stat(text)
    assert [(r["svname"], r["scur"], r["status"]) for r in rows] == [
        ("d1", "2", "UP"), ("d2", "0", "DOWN 1/2")]
    assert cloudnet.backend_status("UP 1/3", False) == "healthy"
    assert cloudnet.backend_status("DOWN 1/2", False) == "unhealthy"
    assert cloudnet.backend_status("MAINT", False) == "unhealthy"
    assert cloudnet.backend_status("DRAIN", False) == "draining"
    assert cloudnet.backend_status("UP", True) == "draining"


# --- real: iptables and HAProxy on a throwaway network (root) --------------------------------

BACKEND_SERVER = """\
import http.server, sys, time
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/slow":
            time.sleep(2)
        body = sys.argv[1].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8000), H).serve_forever()
"""


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """(status, body); (0, "") when nothing answers."""
    try:
        with _DIRECT.open(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""
    except OSError:
        return 0, ""


def _connects(ip: str, port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((ip, port)) == 0


@pytest.mark.lab
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("haproxy", path=hosts.SBIN_PATH) is None,
                    reason="needs root and haproxy")
def test_real_firewall_and_load_balancer(tmp_path: Path) -> None:
    """Two bare netns "hosts" (no nspawn) serving HTTP on 8000, a real LabNetwork."""
    cfg = hosts.LabConfig(prefix="cn", subnet="10.232.0", state_root=tmp_path)
    lab_hosts = [hosts.LabHost.create(cfg, i, tags=("llama3",)) for i in (1, 2)]
    procs: list[subprocess.Popen[bytes]] = []
    server: EmulatorServer | None = None
    try:
        hosts._run(["ip", "link", "add", cfg.bridge, "type", "bridge"])
        for ip in (cfg.bridge_ip, cfg.private_bridge_ip):
            hosts._run(["ip", "addr", "add", f"{ip}/24", "dev", cfg.bridge])
        hosts._run(["ip", "link", "set", cfg.bridge, "up"])
        script = tmp_path / "backend.py"
        script.write_text(BACKEND_SERVER)
        for h in lab_hosts:
            hosts._host_net_up(cfg, h)
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", h.machine, sys.executable, str(script), h.machine],
                env=hosts._tool_env()))
        cfg.state_dir.mkdir(parents=True)
        cfg.lab_json.write_text(json.dumps({"hosts": [h.to_record() for h in lab_hosts]}))
        server = make_server("127.0.0.1", 0, TOKEN, cfg.lab_json,
                             network=cloudnet.LabNetwork(cfg))
        server.start_background()
        h1, h2 = lab_hosts
        wait_for(lambda: _get(f"http://{h1.public_ip}:8000/")[1] == "cnh1")
        wait_for(lambda: _get(f"http://{h2.public_ip}:8000/")[1] == "cnh2")
        _check_firewall(server, cfg, h1, h2)
        _check_load_balancer(server, cfg, h1, h2)
    finally:
        if server is not None:
            server.close()
        for p in procs:
            p.kill()  # by the PID we started
            p.wait(10)
        for h in lab_hosts:
            hosts._host_net_down(cfg, h.index)
        hosts._run(["ip", "link", "del", cfg.bridge], check=False)
    names = hosts._run(["ip", "netns", "list"]).stdout
    assert "cnlb" not in names and "cnh" not in names
    assert "cnlbv" not in hosts._run(["ip", "-o", "link", "show"]).stdout


def _check_firewall(server: EmulatorServer, cfg: hosts.LabConfig, h1: hosts.LabHost,
                    h2: hosts.LabHost) -> None:
    fw = {"name": "fw-ssh", "droplet_ids": [h1.droplet_id], "inbound_rules": [
        {"protocol": "tcp", "ports": "22", "sources": {"addresses": ["192.0.2.0/24"]}}],
        "outbound_rules": [
        {"protocol": "tcp", "ports": "all", "destinations": {"addresses": ["0.0.0.0/0"]}}]}
    fw_id = call(server, "POST", "/v2/firewalls", fw)[2]["firewall"]["id"]

    def status() -> str:
        return call(server, "GET", f"/v2/firewalls/{fw_id}")[2]["firewall"]["status"]

    wait_for(lambda: status() == "succeeded")
    assert not _connects(h1.public_ip, 8000)  # dropped: 8000 is not allowed from us
    assert _connects(h2.public_ip, 8000)  # no firewall applies to h2
    allow = {"protocol": "tcp", "ports": "8000", "sources": {"addresses": [cfg.bridge_ip]}}
    call(server, "PUT", f"/v2/firewalls/{fw_id}",
         {**fw, "inbound_rules": [*fw["inbound_rules"], allow]})
    wait_for(lambda: status() == "succeeded")
    assert _connects(h1.public_ip, 8000)
    assert cloudnet.machine_has_chains(h1.machine)
    assert not cloudnet.machine_has_chains(h2.machine)
    assert call(server, "DELETE", f"/v2/firewalls/{fw_id}")[0] == 204
    wait_for(lambda: not cloudnet.machine_has_chains(h1.machine))


def _check_load_balancer(server: EmulatorServer, cfg: hosts.LabConfig, h1: hosts.LabHost,
                         h2: hosts.LabHost) -> None:
    call(server, "POST", "/v2/tags", {"name": "web"})
    _tag(server, "web", [h1.droplet_id])
    lb = call(server, "POST", "/v2/load_balancers", {**LB, "health_check": {
        "protocol": "http", "port": 8000, "path": "/health", "check_interval_seconds": 3,
        "response_timeout_seconds": 3, "healthy_threshold": 2, "unhealthy_threshold": 2}})[2][
        "load_balancer"]
    lb_path = f"/v2/load_balancers/{lb['id']}"
    wait_for(lambda: call(server, "GET", lb_path)[2]["load_balancer"]["status"] == "active")
    ip = call(server, "GET", lb_path)[2]["load_balancer"]["ip"]
    assert ip == f"{cfg.subnet}.201"

    def backends() -> dict[int, str]:
        got = call(server, "GET", f"/_lab/load_balancers/{lb['id']}/backends")[2]["backends"]
        return {b["droplet_id"]: b["status"] for b in got}

    wait_for(lambda: backends() == {h1.droplet_id: "healthy"}, timeout=15)
    assert _get(f"http://{ip}/") == (200, "cnh1")
    slow: list[tuple[int, str]] = []
    in_flight = threading.Thread(target=lambda: slow.append(_get(f"http://{ip}/slow")))
    in_flight.start()
    time.sleep(0.3)
    _tag(server, "web", [h2.droplet_id])
    _tag(server, "web", [h1.droplet_id], "DELETE")
    wait_for(lambda: backends().get(h2.droplet_id) == "unhealthy", timeout=1.5)
    # h1 left (no new request), h2 has not passed `rise` checks yet: nobody to send to
    for _ in range(3):
        assert _get(f"http://{ip}/")[0] == 503
    in_flight.join(10)
    assert slow == [(200, "cnh1")]  # the request in flight on h1 finished
    wait_for(lambda: backends() == {h2.droplet_id: "healthy"}, timeout=15)
    assert {_get(f"http://{ip}/")[1] for _ in range(4)} == {"cnh2"}
    # new settings: a graceful reload (-sf); members start DOWN again and come back
    put = call(server, "PUT", lb_path, {**LB, "http_idle_timeout_seconds": 120, "health_check":
                                        {**lb["health_check"], "path": "/ready"}})
    assert put[0] == 200
    wait_for(lambda: backends() == {h2.droplet_id: "healthy"}, timeout=15)
    assert _get(f"http://{ip}/") == (200, "cnh2")
    assert call(server, "DELETE", lb_path)[0] == 204
    wait_for(lambda: "cnlb1" not in hosts._run(["ip", "netns", "list"]).stdout)
