"""The DigitalOcean inventory: settings from the environment, groups and host data, every
error message, and real ``pyinfra inventories/do.py ...`` runs against the emulator."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pyinfra.api.exceptions import PyinfraError

from gpufleet.clients.digitalocean import Droplet
from gpufleet.clients.do_inventory import (
    DEFAULT_KNOWN_HOSTS,
    InventoryError,
    InventorySettings,
    build_groups,
    ensure_known_hosts,
    group_name,
    load_do_inventory,
    settings_from_env,
)
from gpufleet_lab.do_emulator import EmulatorServer, base_url, droplet_json, make_server

REPO = Path(__file__).resolve().parents[2]
PYINFRA = Path(sys.executable).with_name("pyinfra")
TOKEN = "dop_v1_inventory-test-secret"


def host(
    i: int,
    *,
    profile: str = "h100",
    tags: tuple[str, ...] = ("llama3",),
    public: bool = True,
    private: bool = True,
    name: str | None = None,
) -> dict[str, Any]:
    return {
        "index": i,
        "machine": f"gfh{i}",
        "droplet_name": name or f"llama3-gpu-{i:02d}",
        "droplet_id": 300000 + i,
        "profile": profile,
        "flavour": "docker",
        "public_ip": f"10.213.0.{10 + i}" if public else None,
        "private_ip": f"10.213.100.{10 + i}" if private else None,
        "region": "tor1",
        "tags": list(tags),
    }


def droplet(i: int, **kw: Any) -> Droplet:
    return Droplet.from_api(droplet_json(host(i, **kw)))


@pytest.fixture
def emulator() -> Iterator[Callable[..., EmulatorServer]]:
    servers: list[EmulatorServer] = []

    def start(source: Any, **options: Any) -> EmulatorServer:
        server = make_server("127.0.0.1", 0, TOKEN, source, **options)
        server.start_background()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def env_for(server: EmulatorServer | None, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {"GPUFLEET_KNOWN_HOSTS": str(tmp_path / "gpufleet" / "known_hosts")}
    if server is not None:
        env |= {"DIGITALOCEAN_TOKEN": TOKEN, "DIGITALOCEAN_API_URL": base_url(server)}
    return env | extra


def settings(**overrides: Any) -> InventorySettings:
    base = settings_from_env({"DIGITALOCEAN_TOKEN": "t", "GPUFLEET_KNOWN_HOSTS": "/tmp/kh"})
    return InventorySettings(**{**base.__dict__, **overrides})


# --- settings --------------------------------------------------------------------------------


def test_defaults() -> None:
    s = settings_from_env({"DIGITALOCEAN_TOKEN": "tok"})
    assert s.token == "tok"
    assert s.api_url == "https://api.digitalocean.com"
    assert s.tag == "llama3" and s.address == "public" and s.ssh_user == "root"
    assert s.ssh_key is None and s.strict_host_keys == "accept-new"
    assert s.known_hosts == os.path.expanduser(DEFAULT_KNOWN_HOSTS)
    assert s.known_hosts.endswith("/.config/gpufleet/known_hosts")
    assert "tok" not in repr(s)


def test_every_variable(tmp_path: Path) -> None:
    key = tmp_path / "id_ed25519"
    key.write_text("not really a key")
    s = settings_from_env(
        {
            "DIGITALOCEAN_ACCESS_TOKEN": "fallback",
            "DIGITALOCEAN_API_URL": "http://127.0.0.1:9999/",
            "GPUFLEET_TAG": "env:prod",
            "GPUFLEET_ADDRESS": "PRIVATE",
            "GPUFLEET_SSH_USER": "ubuntu",
            "GPUFLEET_SSH_KEY": str(key),
            "GPUFLEET_KNOWN_HOSTS": str(tmp_path / "kh"),
            "GPUFLEET_STRICT_HOST_KEYS": "yes",
        }
    )
    assert (s.token, s.api_url, s.tag, s.address) == (
        "fallback",
        "http://127.0.0.1:9999",
        "env:prod",
        "private",
    )
    assert (s.ssh_user, s.ssh_key, s.known_hosts, s.strict_host_keys) == (
        "ubuntu",
        str(key),
        str(tmp_path / "kh"),
        "yes",
    )


def test_digitalocean_token_wins_over_access_token() -> None:
    s = settings_from_env({"DIGITALOCEAN_TOKEN": "a", "DIGITALOCEAN_ACCESS_TOKEN": "b"})
    assert s.token == "a"
    assert (
        settings_from_env({"DIGITALOCEAN_TOKEN": " ", "DIGITALOCEAN_ACCESS_TOKEN": "b"}).token
        == "b"
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "set DIGITALOCEAN_TOKEN (or DIGITALOCEAN_ACCESS_TOKEN) to a DigitalOcean API token"),
        (
            {"GPUFLEET_ADDRESS": "ipv6"},
            "GPUFLEET_ADDRESS must be 'public' or 'private', not 'ipv6'",
        ),
        (
            {"GPUFLEET_STRICT_HOST_KEYS": "maybe"},
            "GPUFLEET_STRICT_HOST_KEYS must be one of accept-new, yes, no, off, ask, not 'maybe'",
        ),
        ({"GPUFLEET_TAG": "llama 3"}, "GPUFLEET_TAG='llama 3' is not a DigitalOcean tag name"),
        (
            {"GPUFLEET_SSH_KEY": "/nonexistent/key"},
            "GPUFLEET_SSH_KEY=/nonexistent/key is not a file",
        ),
    ],
)
def test_settings_errors(env: dict[str, str], message: str) -> None:
    if env:
        env = {"DIGITALOCEAN_TOKEN": "t", **env}
    with pytest.raises(InventoryError) as info:
        settings_from_env(env)
    assert message in str(info.value)
    assert isinstance(info.value, PyinfraError)


# --- groups ----------------------------------------------------------------------------------


def test_groups_public() -> None:
    groups = build_groups([droplet(2), droplet(1, profile="rtx4000ada")], settings())
    assert list(groups) == ["llama3", "gpu"]
    hosts, group_data = groups["llama3"]
    assert group_data == {}
    assert [name for name, _ in hosts] == ["llama3-gpu-01", "llama3-gpu-02"]
    assert hosts[0][1] == {
        "ssh_hostname": "10.213.0.11",
        "ssh_user": "root",
        "ssh_known_hosts_file": "/tmp/kh",
        "ssh_strict_host_key_checking": "accept-new",
        "ssh_connect_retries": 2,
        "droplet_id": 300001,
        "region": "tor1",
        "size": "gpu-4000adax1-20gb",
        "droplet_tags": ["llama3"],
        "private_ip": "10.213.100.11",
    }
    assert [name for name, _ in groups["gpu"][0]] == ["llama3-gpu-01", "llama3-gpu-02"]


def test_groups_private_with_key() -> None:
    groups = build_groups([droplet(1)], settings(address="private", ssh_key="/k", ssh_user="u"))
    data = groups["llama3"][0][0][1]
    assert data["ssh_hostname"] == "10.213.100.11" and data["ssh_key"] == "/k"
    assert data["ssh_user"] == "u"


@pytest.mark.parametrize(
    ("tag", "name"),
    [
        ("llama3", "llama3"),
        ("env:prod", "env_prod"),
        ("8b-fleet", "tag_8b_fleet"),
        ("_x", "tag__x"),
        ("all", "tag_all"),
        ("gpu", "gpu"),
    ],
)
def test_group_names(tag: str, name: str) -> None:
    assert group_name(tag) == name


def test_tag_gpu_gives_one_group() -> None:
    assert list(build_groups([droplet(1, tags=("gpu",))], settings(tag="gpu"))) == ["gpu"]


def test_zero_droplets() -> None:
    with pytest.raises(InventoryError) as info:
        build_groups([], settings(api_url="http://x"))
    assert str(info.value) == (
        "no droplets tagged 'llama3' at http://x: tag the service's droplets with 'llama3' or "
        "set GPUFLEET_TAG; pyinfra would otherwise run on no hosts and exit 0"
    )


def test_missing_address_names_the_droplets() -> None:
    ds = [droplet(1), droplet(2, private=False), droplet(3, private=False)]
    with pytest.raises(InventoryError) as info:
        build_groups(ds, settings(address="private"))
    assert str(info.value) == (
        "droplets 'llama3-gpu-02', 'llama3-gpu-03' tagged 'llama3' have no private IPv4 address "
        "(GPUFLEET_ADDRESS=private); use GPUFLEET_ADDRESS=public or give the droplet a private "
        "address"
    )
    with pytest.raises(InventoryError, match="droplet 'llama3-gpu-01' tagged 'llama3' has no"):
        build_groups([droplet(1, public=False)], settings())


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(InventoryError, match=r"'twin' \(ids 300001, 300002\)"):
        build_groups([droplet(1, name="twin"), droplet(2, name="twin")], settings())


def test_known_hosts_is_created_private(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "known_hosts"
    ensure_known_hosts(str(path))
    assert path.is_file() and path.read_text() == ""
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    path.write_text("existing\n")
    ensure_known_hosts(str(path))
    assert path.read_text() == "existing\n"


def test_known_hosts_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(
        InventoryError, match=r"cannot create the known_hosts file .*GPUFLEET_KNOWN"
    ):
        ensure_known_hosts(str(blocker / "known_hosts"))


# --- against the emulator --------------------------------------------------------------------


def test_load_public_and_private(emulator, tmp_path: Path) -> None:
    server = emulator([host(1), host(2, profile="nogpu"), host(3, tags=("other",))])
    groups = load_do_inventory(env_for(server, tmp_path))
    hosts = groups["llama3"][0]
    assert [(n, d["ssh_hostname"]) for n, d in hosts] == [
        ("llama3-gpu-01", "10.213.0.11"),
        ("llama3-gpu-02", "10.213.0.12"),
    ]
    assert (tmp_path / "gpufleet" / "known_hosts").is_file()
    private = load_do_inventory(env_for(server, tmp_path, GPUFLEET_ADDRESS="private"))
    assert [d["ssh_hostname"] for _, d in private["llama3"][0]] == [
        "10.213.100.11",
        "10.213.100.12",
    ]


def test_load_401(emulator, tmp_path: Path) -> None:
    server = emulator([host(1)])
    wrong = "dop_v1_not-the-right-token"
    with pytest.raises(InventoryError) as info:
        load_do_inventory(env_for(server, tmp_path, DIGITALOCEAN_TOKEN=wrong))
    assert str(info.value) == (
        f"the DigitalOcean API at {base_url(server)} rejected the token (HTTP 401: Unable to "
        "authenticate you); check DIGITALOCEAN_TOKEN (it needs droplet read access, scope "
        "droplet:read and tag:read)"
    )
    assert wrong not in str(info.value) and TOKEN not in str(info.value)


def test_load_unreachable(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = env_for(
        None, tmp_path, DIGITALOCEAN_TOKEN=TOKEN, DIGITALOCEAN_API_URL=f"http://127.0.0.1:{port}"
    )
    from gpufleet.clients.digitalocean import DigitalOceanClient

    def no_wait(token: str, url: str) -> DigitalOceanClient:
        return DigitalOceanClient(token, url, sleep=lambda s: None)

    with pytest.raises(InventoryError) as info:
        load_do_inventory(env, client_factory=no_wait)
    assert str(info.value).startswith(
        f"cannot reach the DigitalOcean API at http://127.0.0.1:{port}: "
    )
    assert TOKEN not in str(info.value)


def test_load_zero_droplets(emulator, tmp_path: Path) -> None:
    server = emulator([host(1, tags=("other",))])
    with pytest.raises(InventoryError, match="no droplets tagged 'llama3'"):
        load_do_inventory(env_for(server, tmp_path))
    assert not (tmp_path / "gpufleet").exists()  # nothing written for a failed inventory


# --- the real pyinfra CLI ---------------------------------------------------------------------


def run_pyinfra(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("DIGITALOCEAN_", "GPUFLEET_"))
    }
    return subprocess.run(
        [str(PYINFRA), "inventories/do.py", *args],
        cwd=REPO,
        env=clean | env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_pyinfra_debug_inventory(emulator, tmp_path: Path) -> None:
    server = emulator([host(1), host(2, profile="rtx4000ada"), host(3, tags=("other",))])
    result = run_pyinfra(env_for(server, tmp_path), "debug-inventory", "--json")
    assert result.returncode == 0, result.stderr
    hosts = {h["name"]: h for h in json.loads(result.stdout)}
    assert sorted(hosts) == ["llama3-gpu-01", "llama3-gpu-02"]
    one = hosts["llama3-gpu-01"]
    assert sorted(one["groups"]) == ["do", "gpu", "llama3"]
    assert one["data"]["ssh_hostname"] == "10.213.0.11"
    assert one["data"]["droplet_id"] == 300001
    assert one["data"]["size"] == "gpu-h100x1-80gb"
    assert one["data"]["ssh_known_hosts_file"] == str(tmp_path / "gpufleet" / "known_hosts")
    assert hosts["llama3-gpu-02"]["data"]["size"] == "gpu-4000adax1-20gb"
    assert TOKEN not in result.stdout + result.stderr


def _assert_one_line_error(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith("--> pyinfra error")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("--> pyinfra error in inventories/do.py line ")
    assert message in lines[0]
    assert TOKEN not in result.stdout + result.stderr


def test_pyinfra_with_zero_droplets_fails(emulator, tmp_path: Path) -> None:
    server = emulator([host(1, tags=("other",))])
    result = run_pyinfra(env_for(server, tmp_path), "exec", "--", "true")
    _assert_one_line_error(result, "no droplets tagged 'llama3' at http://127.0.0.1:")
    assert "pyinfra would otherwise run on no hosts and exit 0" in result.stderr


def test_pyinfra_without_a_token_fails(tmp_path: Path) -> None:
    result = run_pyinfra(env_for(None, tmp_path), "debug-inventory")
    _assert_one_line_error(result, "set DIGITALOCEAN_TOKEN")


def test_pyinfra_with_a_wrong_token_fails(emulator, tmp_path: Path) -> None:
    server = emulator([host(1)])
    result = run_pyinfra(
        env_for(server, tmp_path, DIGITALOCEAN_TOKEN="dop_v1_wrong"), "debug-inventory"
    )
    _assert_one_line_error(result, "rejected the token (HTTP 401: Unable to authenticate you)")
    assert "dop_v1_wrong" not in result.stdout + result.stderr
