"""End-to-end: lab hosts (systemd-nspawn stand-ins for GPU droplets) on this machine.

Boots two hosts of a test-only lab (prefix ``gt``, subnet 10.217.0) and checks what deploys rely
on: strict-host-key SSH on both addresses, the nvidia-smi stand-in, docker, a reboot from
inside, a power cycle, a rebuild (new host key, wiped disk), adding a base-flavour host to the
running lab, and that ``down`` leaves nothing behind. Needs root and systemd-nspawn; the first
run builds the images (about 20 s each), later runs reuse them.

Run: ``sudo .venv/bin/python -m pytest -m lab lab/tests/test_lab_hosts.py -s``
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpufleet_lab import hosts
from gpufleet_lab.hosts import LabConfig, LabHost

LAB_MARKS = [
    pytest.mark.lab,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("systemd-nspawn") is None,
        reason="needs root and systemd-nspawn",
    ),
]

PREFIX, SUBNET = "gt", "10.217.0"
FACT_QUERY = (
    "nvidia-smi --query-gpu=index,uuid,name,memory.total,driver_version,compute_cap"
    " --format=csv,noheader,nounits"
)
NO_DRIVER = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running."
)
TIMINGS: dict[str, float] = {}


class Lab:
    """The booted test lab and helpers to reach its hosts."""

    def __init__(self, cfg: LabConfig, members: list[LabHost]) -> None:
        self.cfg = cfg
        self.hosts = {h.index: h for h in members}

    def ssh(
        self,
        index: int,
        command: str,
        *,
        ip: str | None = None,
        known_hosts: Path | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """``ssh`` with the lab key and StrictHostKeyChecking=yes against ``known_hosts``."""
        kh = known_hosts or self.cfg.known_hosts
        argv = [
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            str(self.cfg.ssh_key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={kh}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=3",
            f"root@{ip or self.hosts[index].public_ip}",
            command,
        ]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)

    def out(self, index: int, command: str) -> str:
        r = self.ssh(index, command)
        assert r.returncode == 0, f"{command}: rc {r.returncode}: {r.stderr}"
        return r.stdout.strip()

    def uptime(self, index: int) -> float | None:
        r = self.ssh(index, "cat /proc/uptime", timeout=10)
        return float(r.stdout.split()[0]) if r.returncode == 0 else None

    def wait_rebooted(self, index: int, before: float, timeout: float = 90) -> float:
        """Poll until the host answers with an uptime below ``before``; returns the seconds."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            up = self.uptime(index)
            if up is not None and up < before:
                return time.monotonic() - t0
            time.sleep(0.3)
        raise AssertionError(f"host {index} did not come back within {timeout}s")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    cfg = LabConfig(prefix=PREFIX, subnet=SUBNET)
    hosts.down(cfg)  # whatever an interrupted earlier run left
    t0 = time.monotonic()
    hosts.ensure_tools()
    hosts.build_rootfs("docker", cfg.cache_dir)
    TIMINGS["image build (docker flavour, 0 if cached)"] = time.monotonic() - t0
    members = [
        LabHost.create(cfg, 1, profile="h100", droplet_name="gt-gpu-01"),
        LabHost.create(cfg, 2, profile="nodriver", droplet_name="gt-gpu-02"),
    ]
    try:
        t0 = time.monotonic()
        hosts.boot(cfg, members)
        TIMINGS["boot 2 hosts (until systemctl is-system-running = running)"] = (
            time.monotonic() - t0
        )
        yield Lab(cfg, members)
    finally:
        hosts.down(cfg)


def _running(pid: int) -> bool:
    """True for a live process (an exited one waiting for PID 1 to reap it does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def _leftovers(cfg: LabConfig, pids: list[int]) -> dict[str, object]:
    def run(*argv: str) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout

    netns = [n for n in run("ip", "netns", "list").split() if n.startswith(f"{PREFIX}h")]
    links = [
        line.split(":")[1].strip()
        for line in run("ip", "-o", "link", "show").splitlines()
        if re.match(rf"\d+: {PREFIX}(br0|v\d+)[@:]", line)
    ]
    rules = [
        line
        for table in ("nat", "filter")
        for line in run("iptables", "-w", "-t", table, "-S").splitlines()
        if cfg.rule_comment in line or "10.217." in line
    ]
    mounts = [
        line.split()[1]
        for line in Path("/proc/self/mounts").read_text().splitlines()
        if str(cfg.state_dir) in line.split()[1]
    ]
    cgroups = [str(p) for p in hosts._cgroup_parents(cfg) if p.exists()]
    alive = [p for p in pids if _running(p)]
    propagate = list(Path("/run/systemd/nspawn/propagate").glob(f"{PREFIX}h*"))
    found = {
        "netns": netns,
        "links": links,
        "rules": rules,
        "mounts": mounts,
        "cgroups": cgroups,
        "pids": alive,
        "propagate": propagate,
        "host dirs": cfg.hosts_dir.exists(),
    }
    return {k: v for k, v in found.items() if v}


# --- pure parts (no root needed) -------------------------------------------------------------


def test_config_names_and_addresses() -> None:
    cfg = LabConfig(prefix="gq", subnet="10.214.0")
    assert (cfg.bridge, cfg.bridge_ip, cfg.private_bridge_ip) == (
        "gqbr0",
        "10.214.0.1",
        "10.214.100.1",
    )
    assert (cfg.machine(3), cfg.veth(3), cfg.public_ip(3), cfg.private_ip(3)) == (
        "gqh3",
        "gqv3",
        "10.214.0.13",
        "10.214.100.13",
    )
    assert cfg.state_dir == Path("/var/tmp/gpufleet-lab/gq")
    assert cfg.mac(1) == LabConfig(prefix="gq", subnet="10.214.0").mac(1) != cfg.mac(2)
    assert int(cfg.mac(1).split(":")[0], 16) & 0b11 == 0b10  # local, unicast
    for bad in ({"prefix": "GQ"}, {"prefix": "toolongprefix"}, {"subnet": "10.214"}):
        with pytest.raises(ValueError):
            LabConfig(**bad)  # type: ignore[arg-type]


def test_host_record_round_trip() -> None:
    cfg = LabConfig(prefix="gq", subnet="10.214.0")
    h = LabHost.create(cfg, 2, profile="rtx4000ada", droplet_name="llama3-gpu-02", tags=["a"])
    rec = h.to_record()
    assert rec["size"] == rec["size_slug"] == "gpu-4000adax1-20gb"
    assert rec["machine"] == "gqh2" and rec["tags"] == ["a"]
    assert LabHost.from_record({**rec, "created_at": "x", "host_key": "y"}) == h
    assert h.droplet_id != LabHost.create(LabConfig(prefix="gr"), 2).droplet_id
    assert [x.profile for x in hosts.make_hosts(cfg, ["h100", "t4"])] == ["h100", "t4"]
    with pytest.raises(ValueError):
        LabHost.create(cfg, 0)
    with pytest.raises(KeyError):
        LabHost.create(cfg, 1, profile="a100")


def test_apt_mirrors_keep_only_debian_bookworm_suites(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "deb [arch=amd64] http://mirror.example/debian bookworm main contrib # comment\n"
        "deb-src http://mirror.example/debian bookworm main\n"
    )
    (tmp_path / "sources.list.d" / "cloud.list").write_text(
        "deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n"
    )
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\n"
        "Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n"
        "Components: main\nEnabled: no\n"
    )
    (tmp_path / "sources.list.d" / "off.list.disabled").write_text("deb http://x bookworm main\n")
    assert hosts.apt_mirrors(tmp_path) == [
        "deb http://mirror.example/debian bookworm main contrib",
        "deb http://deb.debian.org/debian bookworm main",
        "deb http://deb.debian.org/debian bookworm-updates main",
    ]
    assert hosts.apt_mirrors(tmp_path / "missing") == list(hosts.FALLBACK_MIRRORS)


def test_daemon_json_matches_the_contract() -> None:
    cfg = LabConfig(prefix="gq", subnet="10.214.0")
    assert json.loads(hosts.daemon_json(cfg)) == {
        "log-driver": "json-file",
        "log-opts": {"max-size": "10m", "max-file": "3"},
        "registry-mirrors": ["http://10.214.0.1:8702"],
        "insecure-registries": ["10.214.0.1:8702"],
    }


# --- the lab itself (root) -----------------------------------------------------------------


class TestLabHosts:
    """In file order: boot, use, reboot, power cycle, rebuild, grow, down."""

    pytestmark = LAB_MARKS

    def test_ssh_with_strict_host_keys_on_both_addresses(self, lab: Lab, tmp_path: Path) -> None:
        for h in lab.hosts.values():
            for ip in (h.public_ip, h.private_ip):
                r = lab.ssh(h.index, "hostname", ip=ip)
                assert (r.returncode, r.stdout.strip()) == (0, h.droplet_name), r.stderr
        empty = tmp_path / "empty_known_hosts"
        empty.write_text("")
        r = lab.ssh(1, "true", known_hosts=empty)
        assert r.returncode == 255 and "Host key verification failed" in r.stderr
        lines = lab.cfg.known_hosts.read_text().splitlines()
        assert len(lines) == 4 and all(line.split()[1] == "ssh-ed25519" for line in lines)

    def test_lab_json_lists_the_hosts(self, lab: Lab) -> None:
        data = json.loads(lab.cfg.lab_json.read_text())
        assert data["bridge_ip"] == f"{SUBNET}.1" and data["prefix"] == PREFIX
        recs = {h["index"]: h for h in data["hosts"]}
        assert set(recs) == {1, 2}
        for index, h in lab.hosts.items():
            rec = recs[index]
            assert rec["machine"] == f"{PREFIX}h{index}" == h.machine
            assert rec["public_ip"] == f"{SUBNET}.{10 + index}"
            assert rec["private_ip"] == f"10.217.100.{10 + index}"
            assert rec["size"] == rec["size_slug"] == "gpu-h100x1-80gb"
            assert {"droplet_name", "droplet_id", "profile", "flavour", "region", "tags"} <= set(
                rec
            )

    def test_nvidia_smi_standin(self, lab: Lab) -> None:
        assert lab.out(1, FACT_QUERY) == (
            "0, GPU-8dd6ea90-cada-acc3-987d-53d477d01733, NVIDIA H100 80GB HBM3, 81559, "
            "580.159.04, 9.0"
        )
        r = lab.ssh(2, FACT_QUERY)
        assert r.returncode == 9 and r.stdout.strip() == NO_DRIVER

    def test_docker_runs_with_the_preseeded_daemon_json(self, lab: Lab) -> None:
        for index in lab.hosts:
            info = lab.out(index, "docker info --format '{{.Driver}} {{.LoggingDriver}}'")
            assert info == "overlay2 json-file"
            seeded = json.loads(lab.out(index, "cat /etc/docker/daemon.json"))
            assert seeded == json.loads(hosts.daemon_json(lab.cfg))
            assert seeded["registry-mirrors"] == [f"http://{SUBNET}.1:8702"]

    def test_reboot_inside_the_host(self, lab: Lab) -> None:
        lab.out(1, "touch /root/survives-reboot")
        before = lab.uptime(1)
        assert before is not None
        lab.ssh(1, "systemctl reboot")  # the connection may drop: rc is not checked
        TIMINGS["reboot inside host 1 (until ssh answers)"] = lab.wait_rebooted(1, before)
        assert lab.out(1, "systemctl is-system-running --wait") == "running"
        assert lab.out(1, "systemctl is-active docker") == "active"
        assert lab.out(1, "docker info --format '{{.Driver}}'") == "overlay2"
        lab.out(1, "test -f /root/survives-reboot")
        assert "rebooting" in (lab.cfg.hosts_dir / "gth1" / "console.log").read_text()

    def test_power_cycle_keeps_the_disk(self, lab: Lab) -> None:
        lab.out(1, "echo cycled > /root/marker && sync")
        before = lab.uptime(1)
        assert before is not None
        t0 = time.monotonic()
        hosts.power_cycle_host(lab.cfg, 1)
        TIMINGS["power cycle host 1"] = time.monotonic() - t0
        after = lab.uptime(1)
        assert after is not None and after < before
        assert lab.out(1, "cat /root/marker") == "cycled"
        assert lab.out(1, "systemctl is-active docker") == "active"

    def test_rebuild_wipes_the_disk_and_changes_the_host_key(self, lab: Lab) -> None:
        old = lab.cfg.known_hosts.read_text()
        lab.out(2, "echo precious > /root/marker && docker network create gt-marker >/dev/null")
        t0 = time.monotonic()
        key = hosts.rebuild_host(lab.cfg, 2)
        TIMINGS["rebuild host 2"] = time.monotonic() - t0
        assert re.fullmatch(r"ssh-ed25519 [A-Za-z0-9+/=]+", key)
        assert key not in old and lab.cfg.known_hosts.read_text() == old  # not trusted by itself
        r = lab.ssh(2, "true")
        assert r.returncode == 255 and "Host key verification failed" in r.stderr
        hosts.trust_host_key(lab.cfg, lab.hosts[2], key)
        assert lab.out(2, "test -e /root/marker && echo kept || echo gone") == "gone"
        assert "gt-marker" not in lab.out(2, "docker network ls --format '{{.Name}}'")
        assert lab.ssh(2, FACT_QUERY).returncode == 9  # same profile after the rebuild
        assert lab.out(2, "hostname") == "gt-gpu-02"
        assert lab.out(1, "hostname") == "gt-gpu-01"  # the other host is untouched

    def test_add_a_base_flavour_host_to_the_running_lab(self, lab: Lab) -> None:
        t0 = time.monotonic()
        hosts.build_rootfs("base", lab.cfg.cache_dir)
        TIMINGS["image build (base flavour, 0 if cached)"] = time.monotonic() - t0
        extra = LabHost.create(
            lab.cfg, 3, profile="nogpu", flavour="base", droplet_name="gt-cpu-03"
        )
        t0 = time.monotonic()
        hosts.boot(lab.cfg, [extra])
        TIMINGS["boot 1 more host (base flavour)"] = time.monotonic() - t0
        lab.hosts[3] = extra
        assert lab.out(3, "command -v nvidia-smi docker || echo none") == "none"
        assert json.loads(lab.out(3, "cat /etc/docker/daemon.json"))["log-driver"] == "json-file"
        ids = {lab.out(i, "cat /etc/machine-id") for i in (1, 2, 3)}
        assert len(ids) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
        data = json.loads(lab.cfg.lab_json.read_text())
        assert [h["index"] for h in data["hosts"]] == [1, 2, 3]
        assert lab.out(1, "hostname") == "gt-gpu-01"  # known_hosts still has the other hosts
        assert [s.host.index for s in hosts.status(lab.cfg) if s.running and s.ssh] == [1, 2, 3]

    def test_down_leaves_nothing(self, lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
        pids = [s.supervisor_pid for s in hosts.status(lab.cfg)]
        pids += [s.nspawn_pid for s in hosts.status(lab.cfg)]
        lxcfs = (lab.cfg.state_dir / "lxcfs.pid").read_text().split()[0]
        pids = [p for p in pids if p] + [int(lxcfs)]
        assert len(pids) == 7
        t0 = time.monotonic()
        hosts.down(lab.cfg)
        TIMINGS["down (3 hosts)"] = time.monotonic() - t0
        assert _leftovers(lab.cfg, pids) == {}
        assert hosts.status(lab.cfg) == []
        hosts.down(lab.cfg)  # safe twice
        assert _leftovers(lab.cfg, pids) == {}
        with capsys.disabled():
            print("\nlab host timings:")
            for what, seconds in TIMINGS.items():
                print(f"  {what}: {seconds:.1f}s")
