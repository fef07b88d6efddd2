"""The lab's DigitalOcean API emulator: JSON shapes, the GPU caveat, pagination, auth, rate
limiting, actions and hooks, snapshots, lab.json reloading."""

from __future__ import annotations

import functools
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpufleet.model import gpus as gpu_catalog
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
