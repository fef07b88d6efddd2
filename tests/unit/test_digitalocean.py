"""The DigitalOcean client against the lab emulator, in process: pagination, the tag/GPU
union, back-off on 429 and 5xx, errors that never show the token, actions and snapshots."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from gpufleet.clients.digitalocean import (
    DigitalOceanClient,
    DigitalOceanError,
    Droplet,
    GpuInfo,
    Size,
    retry_after_seconds,
    union_tagged,
)
from gpufleet_lab.do_emulator import EmulatorServer, Hooks, base_url, droplet_json, make_server

TOKEN = "dop_v1_client-test-secret-0123456789"


def host(
    i: int,
    *,
    profile: str = "h100",
    tags: tuple[str, ...] = ("llama3",),
    private: bool = True,
) -> dict[str, Any]:
    return {
        "index": i,
        "machine": f"gfh{i}",
        "droplet_name": f"node-{i:04d}",
        "droplet_id": 100000 + i,
        "profile": profile,
        "flavour": "docker",
        "public_ip": f"10.{i // 250}.{i % 250}.1",
        "private_ip": f"10.100.{i % 250}.{i // 250 + 2}" if private else None,
        "region": "tor1",
        "tags": list(tags),
    }


class FakeTime:
    """An injectable sleep + clock pair: sleeping advances the clock instantly."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


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


def client_for(server: EmulatorServer, fake: FakeTime | None = None, **kw: Any):
    fake = fake or FakeTime()
    return DigitalOceanClient(
        TOKEN, base_url(server), timeout=10, sleep=fake.sleep, clock=fake.clock, **kw
    )


def droplet_requests(server: EmulatorServer) -> list[str]:
    return [path for method, path in server.state.requests if path.startswith("/v2/droplets?")]


# --- listing -----------------------------------------------------------------------------------


def test_more_than_200_tagged_droplets_are_paginated(emulator) -> None:
    server = emulator([host(i) for i in range(1, 451)])
    droplets = client_for(server).list_droplets("llama3")
    assert len(droplets) == 450 and len({d.id for d in droplets}) == 450
    assert [d.name for d in droplets] == sorted(d.name for d in droplets)
    requests = droplet_requests(server)
    # 3 pages of the tag listing, 3 of the GPU listing, always 200 a page, never combined
    assert len(requests) == 6
    assert all("per_page=200" in r for r in requests)
    assert sum("tag_name=llama3" in r for r in requests) == 3
    assert sum("type=gpus" in r for r in requests) == 3
    assert not any("tag_name" in r and "type=" in r for r in requests)


def test_small_pages_are_followed_through_links_next(emulator) -> None:
    hosts = [host(i) for i in range(1, 8)] + [host(i, profile="nogpu") for i in range(8, 11)]
    server = emulator(hosts, max_per_page=2)
    droplets = client_for(server).list_droplets("llama3")
    assert [d.id for d in droplets] == [100000 + i for i in range(1, 11)]
    # 10 tagged -> 5 pages; 7 GPU -> 4 pages
    assert len(droplet_requests(server)) == 9


def test_only_droplets_carrying_the_tag(emulator) -> None:
    server = emulator(
        [
            host(1),
            host(2, tags=("other",)),  # a GPU droplet of another service: type=gpus returns it
            host(3, profile="nogpu", tags=("other",)),
            host(4, profile="nogpu", tags=("llama3", "extra")),
            host(5, tags=()),
        ]
    )
    droplets = client_for(server).list_droplets("llama3")
    assert [d.name for d in droplets] == ["node-0001", "node-0004"]
    assert client_for(server).list_droplets("nothing") == []


def test_gpu_droplets_are_found_even_when_tag_listing_omits_them(emulator) -> None:
    """The other reading of the GPU caveat: tag_name returns non-GPU droplets only."""
    server = emulator(
        [host(1), host(2, profile="nogpu"), host(3, profile="t4"), host(4, tags=("x",))],
        tag_filter_includes_gpus=False,
    )
    droplets = client_for(server).list_droplets("llama3")
    assert [(d.name, d.is_gpu) for d in droplets] == [
        ("node-0001", True),
        ("node-0002", False),
        ("node-0003", True),
    ]


def test_union_tagged_deduplicates_by_id() -> None:
    a = Droplet.from_api(droplet_json(host(1)))
    b = Droplet.from_api(droplet_json(host(2, tags=("other",))))
    c = Droplet.from_api(droplet_json(host(3)))
    assert union_tagged([a], [a, b, c], "llama3") == [a, c]


def test_droplet_parsing(emulator) -> None:
    server = emulator([host(1), host(2, profile="nogpu", private=False)])
    client = client_for(server)
    gpu = client.get_droplet(100001)
    assert gpu == Droplet(
        id=100001,
        name="node-0001",
        region="tor1",
        size="gpu-h100x1-80gb",
        status="active",
        tags=("llama3",),
        public_ipv4="10.0.1.1",
        private_ipv4="10.100.1.2",
        image_slug="gpu-h100x1-base",
        image_id=gpu.image_id,
        gpu_info=GpuInfo(count=1, model="nvidia_h100", vram_amount=80, vram_unit="gib"),
    )
    assert isinstance(gpu.image_id, int) and gpu.is_gpu
    assert gpu.address("public") == "10.0.1.1" and gpu.address("private") == "10.100.1.2"
    cpu = client.get_droplet(100002)
    assert cpu.gpu_info is None and not cpu.is_gpu and cpu.private_ipv4 is None
    assert cpu.size == "s-4vcpu-8gb"


def test_parsing_tolerates_missing_optional_fields() -> None:
    d = Droplet.from_api({"id": 5, "name": "x", "size": {"slug": "s-1vcpu-1gb"}, "image": None})
    assert d.size == "s-1vcpu-1gb" and d.public_ipv4 is None and d.image_slug is None
    with pytest.raises(DigitalOceanError, match="no id/name"):
        Droplet.from_api({"name": "no-id"})


def test_list_sizes_follows_pages_and_reads_price_and_availability(emulator) -> None:
    server = emulator([], unavailable_sizes=["gpu-h100x8-640gb"], max_per_page=3)
    sizes = {s.slug: s for s in client_for(server).list_sizes()}
    assert len([p for m, p in server.state.requests if p.startswith("/v2/sizes")]) >= 3
    h100 = sizes["gpu-h100x1-80gb"]
    assert h100.price_hourly == 3.39 and h100.buyable and h100.regions
    assert h100.gpu_info == GpuInfo(count=1, model="nvidia_h100", vram_amount=80, vram_unit="gib")
    assert not sizes["gpu-h100x8-640gb"].buyable and sizes["gpu-h100x8-640gb"].regions == ()
    assert sizes["s-4vcpu-8gb"].gpu_info is None


def test_size_parsing_tolerates_missing_fields_but_not_a_missing_slug() -> None:
    size = Size.from_api({"slug": "gpu-x", "price_hourly": "n/a", "regions": []})
    assert size.price_hourly is None and size.price_monthly is None and not size.buyable
    assert Size.from_api({"slug": "gpu-y", "price_hourly": 1.5, "regions": ["nyc2"]}).buyable
    with pytest.raises(DigitalOceanError, match="no slug"):
        Size.from_api({"price_hourly": 1.0})


def test_unknown_droplet_is_a_404_error(emulator) -> None:
    server = emulator([host(1)])
    with pytest.raises(DigitalOceanError) as info:
        client_for(server).get_droplet(42)
    assert info.value.status == 404 and "HTTP 404 not_found" in str(info.value)


# --- rate limits and server errors ------------------------------------------------------------


def test_429_is_waited_out_with_retry_after(emulator) -> None:
    server = emulator([host(1)], ratelimit_next=3, retry_after=7)
    fake = FakeTime()
    droplets = client_for(server, fake).list_droplets("llama3")
    assert [d.name for d in droplets] == ["node-0001"]
    assert fake.sleeps == [8.0, 8.0, 8.0]  # Retry-After + 1 s


def test_429_gives_up_after_max_retries(emulator) -> None:
    server = emulator([host(1)], ratelimit_next=50)
    fake = FakeTime()
    with pytest.raises(DigitalOceanError) as info:
        client_for(server, fake, max_retries=2).list_droplets("llama3")
    assert info.value.status == 429
    message = str(info.value)
    assert "rate limit exceeded" in message and "API Rate limit exceeded." in message
    assert "gave up after 2 retries" in message
    assert len(fake.sleeps) == 2


def test_retry_after_and_ratelimit_reset_parsing() -> None:
    now = 1_700_000_000.0
    assert retry_after_seconds({"Retry-After": "12"}, now) == 12.0
    assert retry_after_seconds({"Retry-After": "Tue, 14 Nov 2023 22:13:40 GMT"}, now) == 20.0
    assert retry_after_seconds({"ratelimit-reset": str(int(now) + 30)}, now) == 30.0
    assert retry_after_seconds({"ratelimit-reset": str(int(now) - 30)}, now) == 0.0
    assert retry_after_seconds({}, now) is None


def test_429_without_retry_after_uses_ratelimit_reset() -> None:
    client = DigitalOceanClient(TOKEN, clock=lambda: 1000.0, max_backoff=60)
    headers = {"ratelimit-reset": "1010"}
    assert client._retry_delay("GET", 429, headers, 0) == 11.0
    assert client._retry_delay("GET", 429, {"ratelimit-reset": "99999"}, 0) == 60.0  # capped
    assert client._retry_delay("GET", 429, {}, 2) == 4.0  # exponential fallback


def test_5xx_on_get_is_retried_with_backoff(emulator) -> None:
    server = emulator([host(1)])
    server.state.errors_next, server.state.errors_status = 2, 503
    fake = FakeTime()
    assert client_for(server, fake).get_droplet(100001).name == "node-0001"
    assert fake.sleeps == [1.0, 2.0]


def test_5xx_gives_up_after_max_retries(emulator) -> None:
    server = emulator([host(1)])
    server.state.errors_next, server.state.errors_status = 10, 500
    fake = FakeTime()
    with pytest.raises(DigitalOceanError, match=r"HTTP 500 server_error.*gave up after 3"):
        client_for(server, fake, max_retries=3).get_droplet(100001)
    assert fake.sleeps == [1.0, 2.0, 4.0]


def test_500_on_an_action_is_not_repeated_but_503_is(emulator) -> None:
    server = emulator([host(1)])
    fake = FakeTime()
    client = client_for(server, fake)
    server.state.errors_next, server.state.errors_status = 1, 500
    with pytest.raises(DigitalOceanError, match="HTTP 500"):
        client.reboot(100001)
    assert fake.sleeps == []
    server.state.errors_next, server.state.errors_status = 1, 503
    action = client.reboot(100001)
    assert action.type == "reboot" and fake.sleeps == [1.0]
    server.state.wait_idle()


# --- auth and secrecy -------------------------------------------------------------------------


def test_401_names_the_status_and_message_but_not_the_token(emulator) -> None:
    server = emulator([host(1)])
    bad = "dop_v1_wrong-token-which-must-not-leak"
    client = DigitalOceanClient(bad, base_url(server), sleep=FakeTime().sleep)
    with pytest.raises(DigitalOceanError) as info:
        client.list_droplets("llama3")
    err = info.value
    assert err.status == 401 and err.error_id == "unauthorized"
    assert err.api_message == "Unable to authenticate you"
    assert str(err) == (
        "DigitalOcean API GET /v2/droplets?tag_name=llama3&per_page=200 failed: "
        "HTTP 401 unauthorized: Unable to authenticate you"
    )
    assert bad not in str(err) and bad not in repr(err) and bad not in repr(client)


def test_the_token_is_never_in_urls(emulator) -> None:
    server = emulator([host(1)])
    client_for(server).list_droplets("llama3")
    assert server.state.requests and not any(TOKEN in p for _, p in server.state.requests)


def test_a_token_with_a_newline_is_refused_without_echoing_it() -> None:
    with pytest.raises(DigitalOceanError) as info:
        DigitalOceanClient("secret-part\nmore")
    assert "secret" not in str(info.value) and "whitespace" in str(info.value)
    assert DigitalOceanClient("  padded-token \n")._token == "padded-token"
    with pytest.raises(DigitalOceanError, match="no DigitalOcean API token"):
        DigitalOceanClient("")
    with pytest.raises(DigitalOceanError, match="must be http"):
        DigitalOceanClient("t", "api.digitalocean.com")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_api(emulator) -> None:
    port = _free_port()
    fake = FakeTime()
    client = DigitalOceanClient(TOKEN, f"http://127.0.0.1:{port}", sleep=fake.sleep)
    with pytest.raises(DigitalOceanError) as info:
        client.list_droplets("llama3")
    message = str(info.value)
    assert message.startswith(f"cannot reach the DigitalOcean API at http://127.0.0.1:{port}: ")
    assert "refused" in message.lower()
    assert info.value.status is None and TOKEN not in message
    assert fake.sleeps == [1.0, 2.0]  # connect_retries=2 for a GET
    fake.sleeps.clear()
    with pytest.raises(DigitalOceanError, match="cannot reach"):
        client.reboot(1)
    assert fake.sleeps == []  # a POST is never repeated blindly


class _Capture(BaseHTTPRequestHandler):
    seen: list[tuple[str, str | None]] = []
    redirect_to = ""

    def do_GET(self) -> None:  # noqa: N802
        type(self).seen.append((self.path, self.headers.get("Authorization")))
        if self.path.startswith("/v2/"):
            self.send_response(302)
            self.send_header("Location", f"{self.redirect_to}/stolen")
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


def test_redirects_are_not_followed_so_the_token_stays_put() -> None:
    _Capture.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Capture)
    _Capture.redirect_to = f"http://localhost:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        client = DigitalOceanClient(
            TOKEN, f"http://127.0.0.1:{server.server_address[1]}", sleep=FakeTime().sleep
        )
        with pytest.raises(DigitalOceanError, match="HTTP 302"):
            client.get_droplet(1)
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
    assert [p for p, _ in _Capture.seen] == ["/v2/droplets/1"]


def test_next_links_are_rebased_on_the_configured_api() -> None:
    client = DigitalOceanClient(TOKEN, "http://127.0.0.1:8080/")
    assert client.base_url == "http://127.0.0.1:8080"
    assert client._rebase("https://api.digitalocean.com/v2/droplets?page=2&per_page=200") == (
        "http://127.0.0.1:8080/v2/droplets?page=2&per_page=200"
    )
    assert client._rebase("http://127.0.0.1:8080/v2/droplets?page=3") == (
        "http://127.0.0.1:8080/v2/droplets?page=3"
    )


# --- actions and snapshots --------------------------------------------------------------------


def test_rebuild_and_wait(emulator) -> None:
    calls: list[tuple[str, Any]] = []

    def on_rebuild(droplet: dict[str, Any], image: Any) -> None:
        calls.append((droplet["machine"], image))

    server = emulator([host(1)], Hooks(on_rebuild=on_rebuild))
    fake = FakeTime()
    client = client_for(server, fake)
    action = client.rebuild(100001, "gpu-h100x1-base")
    assert action.status == "in-progress" and action.type == "rebuild"
    assert action.resource_id == 100001 and action.resource_type == "droplet"
    assert action.region_slug == "tor1" and not action.done
    server.state.wait_idle()
    done = client.wait_action(action.id, timeout=60, interval=2)
    assert done.status == "completed" and done.completed_at and done.done
    assert calls == [("gfh1", "gpu-h100x1-base")]
    assert client.get_action(action.id) == done
    assert fake.sleeps == []  # already completed: no polling sleep


def test_wait_action_polls_until_completed(emulator) -> None:
    gate = threading.Event()
    server = emulator([host(1)], Hooks(on_power_cycle=lambda d: gate.wait(10)))
    fake = FakeTime()
    client = client_for(server, fake)
    action = client.power_cycle(100001)

    def sleep(seconds: float) -> None:
        fake.sleep(seconds)
        if len(fake.sleeps) == 3:
            gate.set()
            server.state.wait_idle()

    client._sleep = sleep
    assert client.wait_action(action.id, timeout=600, interval=5).status == "completed"
    assert fake.sleeps == [5, 5, 5]


def test_wait_action_times_out(emulator) -> None:
    gate = threading.Event()
    server = emulator([host(1)], Hooks(on_reboot=lambda d: gate.wait(10)))
    fake = FakeTime()
    client = client_for(server, fake)
    action = client.reboot(100001)
    try:
        with pytest.raises(DigitalOceanError, match=r"did not complete within 12 s"):
            client.wait_action(action.id, timeout=12, interval=5)
        assert fake.sleeps == [5, 5, 2]
    finally:
        gate.set()


def test_errored_action_raises(emulator) -> None:
    def fail(droplet: dict[str, Any], name: str, snapshot_id: int) -> None:
        raise RuntimeError("disk full")

    server = emulator([host(1)], Hooks(on_snapshot=fail))
    client = client_for(server)
    action = client.snapshot(100001, "nightly")
    server.state.wait_idle()
    with pytest.raises(
        DigitalOceanError, match=r"action \d+ \(snapshot\) on droplet 100001 errored"
    ):
        client.wait_action(action.id, timeout=60)


def test_pending_event_is_a_clear_error(emulator) -> None:
    gate = threading.Event()
    server = emulator([host(1)], Hooks(on_reboot=lambda d: gate.wait(10)))
    client = client_for(server)
    client.reboot(100001)
    try:
        with pytest.raises(DigitalOceanError) as info:
            client.power_cycle(100001)
        assert info.value.status == 422
        assert "Droplet already has a pending event." in str(info.value)
    finally:
        gate.set()


def test_snapshots(emulator) -> None:
    server = emulator([host(1), host(2)])
    client = client_for(server)
    action = client.droplet_action(100001, "snapshot", name="pre-upgrade")
    server.state.wait_idle()
    client.wait_action(action.id, timeout=60)
    snaps = client.list_snapshots(100001)
    assert [(s.name, s.resource_id, s.regions) for s in snaps] == [
        ("pre-upgrade", 100001, ("tor1",))
    ]
    assert client.list_snapshots(100002) == []
    everything = client.list_droplet_snapshots()
    assert [(s.id, s.resource_id) for s in everything] == [(snaps[0].id, 100001)]
    rebuild = client.rebuild(100002, snaps[0].id)
    server.state.wait_idle()
    client.wait_action(rebuild.id, timeout=60)
    assert client.get_droplet(100002).image_id == snaps[0].id
