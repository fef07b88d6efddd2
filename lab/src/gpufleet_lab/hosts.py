"""Lab hosts: local stand-ins for GPU droplets (TEST INFRASTRUCTURE, not a deploy target).

Each lab host is a ``systemd-nspawn -b`` container booted from a cached Debian bookworm root
file system (built with mmdebstrap) through its own overlayfs, in its own network namespace on
the lab bridge. Inside it is a real Debian machine: systemd, sshd with its own ed25519 host key,
apt reaching Debian's mirror through NAT, docker.io (docker flavour), and, for GPU profiles,
the stand-in ``/usr/bin/nvidia-smi`` that replays real recordings (see ``profiles.py``). What is
not real: the kernel is the CI machine's, /proc shows the machine's CPUs and memory (uptime is
per host, from lxcfs), and there is no GPU.

The choices below each avoid a pitfall of running docker in nspawn containers:
per-host cgroups (with no systemd on the machine nspawn would put every host into the same
``/payload``), v1 controllers remounted rw inside for docker, ``SYSTEMD_SECCOMP=0``,
``SYSTEMD_NSPAWN_API_VFS_WRITABLE=network``, ``--capability=all``, plain directories bound at
/var/lib/docker and /var/lib/containerd (overlay2 cannot sit on overlayfs), raised inotify
limits, lxcfs' /proc/uptime so reboots are visible, and nspawn's exit status 133 = reboot.

State of lab ``<prefix>`` (default ``gf``) lives in ``/var/tmp/gpufleet-lab/<prefix>/``:

* ``lab.json``: the lab (bridge, subnets, key paths) and ``hosts[]`` records (this module merges
  its keys into the file under ``lab.json.lock``; other keys, e.g. service ports, are kept).
* ``id_ed25519``: the lab's SSH key (root and ``deploy`` accept it on every host).
* ``known_hosts``: each host's ed25519 key under its public and its private IP.
* ``hosts/<machine>/``: overlay ``upper``/``work``/``merged``, ``docker``, ``containerd``,
  ``console.log``, ``supervisor.pid`` and ``nspawn.pid`` (``PID STARTTIME``), ``cgroups.json``,
  ``supervisor.json``, ``host.json``, ``known_hosts`` (just this host).
* ``lxcfs/`` (mount point), ``lxcfs.pid``, ``net.json`` (the bridge and NAT rules are up).

Every process this module starts is recorded by PID (with its start time, so a reused PID is
never signalled) and ended by that PID; nothing is ever looked up or killed by name.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from hashlib import sha256
from importlib import resources
from pathlib import Path
from typing import Any

from gpufleet_lab import profiles

log = logging.getLogger(__name__)

STATE_ROOT = Path("/var/tmp/gpufleet-lab")
CACHE_DIR = STATE_ROOT / "cache"
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the directory that holds gpufleet/

FLAVOURS = ("docker", "base")
IMAGE_REVISION = 1  # bump when _customize_rootfs changes, so cached images are rebuilt
SUITE = "bookworm"
MIRROR_SUITES = ("bookworm", "bookworm-updates", "bookworm-security")
FALLBACK_MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
BASE_PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "python3",
    "sudo",
    "ca-certificates",
    "curl",
    "gnupg",
    "iproute2",
    "iputils-ping",
    "procps",
    "less",
)
FLAVOUR_PACKAGES = {"docker": ("docker.io",), "base": ()}
DISABLED_TIMERS = ("apt-daily", "apt-daily-upgrade", "dpkg-db-backup", "e2scrub_all", "fstrim")
# command -> Debian package that provides it (ensure_tools installs what is missing): the one
# list, shared with lab/install-tools.sh


def _host_tools() -> dict[str, str]:
    """host_tools.txt: what the lab runs on this machine -> its Debian package."""
    text = resources.files("gpufleet_lab").joinpath("host_tools.txt").read_text()
    rows = (line.split() for line in text.splitlines() if line.strip() and line[0] != "#")
    return {what: package for what, package in rows}


TOOLS = {k: v for k, v in _host_tools().items() if not k.startswith(("/", "python3:"))}
# files mmdebstrap needs that no command stands for
TOOL_FILES = {k: v for k, v in _host_tools().items() if k.startswith("/")}
REGISTRY_PORT = 8702  # the registry stand-in on the bridge IP (services.py)
DEFAULT_REGION = "nyc2"
DEFAULT_TAGS = ("gpufleet",)
DEFAULT_NAME = "llama3-gpu-{index:02d}"
MAX_INDEX = 99
NSPAWN_REBOOT = 133  # systemd-nspawn's exit status when the container rebooted

# Units baked into every image. The first makes /proc/uptime per host (lxcfs) so a reboot is
# visible; the second remounts the v1 controllers rw (nspawn mounts them read-only) for docker.
UPTIME_UNIT = """\
[Unit]
Description=Per-host /proc/uptime from lxcfs (gpufleet lab)
DefaultDependencies=no
ConditionPathExists=/var/lib/lxcfs/proc/uptime
Before=sysinit.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/mount --bind /var/lib/lxcfs/proc/uptime /proc/uptime

[Install]
WantedBy=sysinit.target
"""
CGROUP_RW_UNIT = """\
[Unit]
Description=Writable v1 cgroup controllers for docker (gpufleet lab)
DefaultDependencies=no
Before=sysinit.target containerd.service docker.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/gpufleet-lab-cgroup-rw

[Install]
WantedBy=sysinit.target
"""
CGROUP_RW_SCRIPT = """\
#!/bin/sh
# gpufleet lab: nspawn mounts the v1 cgroup controllers read-only; docker needs them writable.
# A plain "remount,rw" fails with "mount point is busy"; a bind remount works.
for c in /sys/fs/cgroup/*/; do
  case $c in */systemd/|*/unified/) continue ;; esac
  mountpoint -q "$c" && mount -o remount,bind,rw "$c"
done
exit 0
"""
SSHD_CONFIG = "# gpufleet lab\nUseDNS no\nHostKey /etc/ssh/ssh_host_ed25519_key\n"


class LabError(RuntimeError):
    """A lab operation failed; the message says which host and why."""


# ------------------------------------------------------------------------------------------
# Configuration and hosts
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabConfig:
    """One lab: its name prefix, its /24 subnet prefix and where its state lives.

    ``subnet="10.213.0"`` gives the public network 10.213.0.0/24 and the private ("VPC")
    network 10.213.100.0/24 on the same bridge ``<prefix>br0`` (``.1`` in both). Labs with
    other prefixes and subnets run side by side.
    """

    prefix: str = "gf"
    subnet: str = "10.213.0"
    state_root: Path = STATE_ROOT
    cache_dir: Path = CACHE_DIR
    boot_timeout: float = 180.0
    stop_timeout: float = 15.0

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", self.prefix):
            raise ValueError(f"lab prefix {self.prefix!r}: 1-8 of [a-z0-9], starting with a letter")
        octets = self.subnet.split(".")
        if len(octets) != 3 or not all(o.isdigit() and int(o) <= 255 for o in octets):
            raise ValueError(f"lab subnet {self.subnet!r}: three octets, like 10.213.0")
        if int(octets[2]) > 155:
            raise ValueError(f"lab subnet {self.subnet!r}: third octet + 100 must stay <= 255")
        object.__setattr__(self, "state_root", Path(self.state_root))
        object.__setattr__(self, "cache_dir", Path(self.cache_dir))

    @property
    def state_dir(self) -> Path:
        return self.state_root / self.prefix

    @property
    def hosts_dir(self) -> Path:
        return self.state_dir / "hosts"

    @property
    def private_subnet(self) -> str:
        a, b, c = self.subnet.split(".")
        return f"{a}.{b}.{int(c) + 100}"

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br0"

    @property
    def bridge_ip(self) -> str:
        return f"{self.subnet}.1"

    @property
    def private_bridge_ip(self) -> str:
        return f"{self.private_subnet}.1"

    @property
    def ssh_key(self) -> Path:
        return self.state_dir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.state_dir / "known_hosts"

    @property
    def lab_json(self) -> Path:
        return self.state_dir / "lab.json"

    @property
    def lxcfs_dir(self) -> Path:
        return self.state_dir / "lxcfs"

    @property
    def cgroup_name(self) -> str:
        return f"{self.prefix}lab"

    @property
    def rule_comment(self) -> str:
        return f"gpufleet-lab:{self.prefix}"

    def machine(self, index: int) -> str:
        return f"{self.prefix}h{index}"

    def veth(self, index: int) -> str:
        return f"{self.prefix}v{index}"

    def mac(self, index: int) -> str:
        """eth0's MAC: stable per lab and host, so the machine's ARP cache stays right across
        rebuilds and power cycles (a random one leaves a stale entry for up to a minute)."""
        h = sha256(f"{self.prefix}:{self.subnet}:{index}".encode()).digest()
        return ":".join(f"{b:02x}" for b in (0x02, *h[:5]))

    def public_ip(self, index: int) -> str:
        return f"{self.subnet}.{10 + index}"

    def private_ip(self, index: int) -> str:
        return f"{self.private_subnet}.{10 + index}"


@dataclass(frozen=True)
class LabHost:
    """One lab host, described like the droplet it stands in for."""

    index: int
    machine: str
    droplet_name: str
    droplet_id: int
    profile: str
    flavour: str
    public_ip: str
    private_ip: str
    region: str
    size_slug: str
    tags: tuple[str, ...] = DEFAULT_TAGS

    @classmethod
    def create(
        cls,
        cfg: LabConfig,
        index: int,
        *,
        profile: str = profiles.DEFAULT_PROFILE,
        flavour: str = "docker",
        droplet_name: str | None = None,
        droplet_id: int | None = None,
        region: str = DEFAULT_REGION,
        size_slug: str | None = None,
        tags: Sequence[str] = DEFAULT_TAGS,
    ) -> LabHost:
        """Host ``index`` (1-based) of lab ``cfg``; names and addresses follow the contract."""
        if not 1 <= index <= MAX_INDEX:
            raise ValueError(f"host index {index}: must be 1..{MAX_INDEX}")
        if flavour not in FLAVOURS:
            raise ValueError(f"flavour {flavour!r}: one of {', '.join(FLAVOURS)}")
        spec = profiles.get_profile(profile)
        return cls(
            index=index,
            machine=cfg.machine(index),
            droplet_name=droplet_name or DEFAULT_NAME.format(index=index),
            droplet_id=droplet_id or default_droplet_id(cfg, index),
            profile=profile,
            flavour=flavour,
            public_ip=cfg.public_ip(index),
            private_ip=cfg.private_ip(index),
            region=region,
            size_slug=size_slug or spec.size_slug,
            tags=tuple(tags),
        )

    def to_record(self) -> dict[str, Any]:
        """The ``hosts[]`` entry of lab.json (``size`` is the slug; ``size_slug`` an alias)."""
        rec = asdict(self)
        rec["tags"] = list(self.tags)
        rec["size"] = self.size_slug
        return rec

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> LabHost:
        names = cls.__dataclass_fields__
        values = {k: v for k, v in rec.items() if k in names}
        values.setdefault("size_slug", rec.get("size", ""))
        values["tags"] = tuple(values.get("tags") or ())
        return cls(**values)


def default_droplet_id(cfg: LabConfig, index: int) -> int:
    """A stable droplet id, distinct per lab prefix and host index."""
    return 400_000_000 + (zlib.crc32(cfg.prefix.encode()) % 10_000) * 100 + index


def make_hosts(
    cfg: LabConfig,
    host_profiles: Sequence[str],
    *,
    flavour: str = "docker",
    name: str = DEFAULT_NAME,
    region: str = DEFAULT_REGION,
    tags: Sequence[str] = DEFAULT_TAGS,
) -> list[LabHost]:
    """Hosts 1..N with these GPU profiles, named ``name.format(index=i)``."""
    return [
        LabHost.create(
            cfg,
            i,
            profile=p,
            flavour=flavour,
            droplet_name=name.format(index=i),
            region=region,
            tags=tags,
        )
        for i, p in enumerate(host_profiles, start=1)
    ]


@dataclass(frozen=True)
class HostStatus:
    """What ``status`` found for one host."""

    host: LabHost
    running: bool
    ssh: bool
    supervisor_pid: int | None
    nspawn_pid: int | None


# ------------------------------------------------------------------------------------------
# Small utilities: commands, locks, files
# ------------------------------------------------------------------------------------------


def _run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float | None = 120,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output; ``LabError`` with its stderr if it fails."""
    try:
        r = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_tool_env(env),
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise LabError(f"timed out after {timeout}s: {shlex.join(argv)}") from e
    if check and r.returncode != 0:
        detail = (r.stderr or r.stdout).strip()
        raise LabError(f"failed (rc {r.returncode}): {shlex.join(argv)}: {detail}")
    return r


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created), held for the ``with`` block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _inside(root: Path, rel: str) -> Path:
    """``root/rel``, refusing paths whose parent resolves outside ``root`` (symlinks)."""
    p = root / rel.lstrip("/")
    if not p.parent.resolve().is_relative_to(root.resolve()):
        raise LabError(f"{p} leaves the host's root file system")
    return p


SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _tool_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: ours) with the sbin directories on PATH (ip, iptables, sysctl...)."""
    env = dict(os.environ if env is None else env)
    env["PATH"] = ":".join(filter(None, [env.get("PATH", ""), SBIN_PATH]))
    return env


def _which(cmd: str) -> str | None:
    return shutil.which(cmd, path=_tool_env()["PATH"])


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------------------
# Processes: recorded by PID and start time, never looked up by name
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PidRecord:
    """A process we started: its PID and its start time (clock ticks since boot)."""

    pid: int
    start: int


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, starttime) of ``pid``, or None when it does not exist."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    rest = raw[raw.rindex(")") + 2 :].split()
    return rest[0], int(rest[1]), int(rest[19])


def _read_pidfile(path: Path) -> PidRecord | None:
    try:
        parts = path.read_text().split()
    except FileNotFoundError:
        return None
    if not parts or not parts[0].isdigit():
        return None
    start = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1
    return PidRecord(int(parts[0]), start)


def _write_pidfile(path: Path, pid: int) -> PidRecord:
    st = _proc_stat(pid)
    rec = PidRecord(pid, st[2] if st else -1)
    _write_atomic(path, f"{rec.pid} {rec.start}\n")
    return rec


def _alive(rec: PidRecord | None) -> bool:
    """True while the recorded process runs (not a zombie, not a reused PID)."""
    if rec is None:
        return False
    st = _proc_stat(rec.pid)
    return st is not None and st[0] not in "ZX" and (rec.start < 0 or st[2] == rec.start)


def _kill(rec: PidRecord | None, sig: int) -> None:
    if _alive(rec):
        assert rec is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(rec.pid, sig)


def _children(pid: int) -> list[PidRecord]:
    """Direct children of ``pid`` (for nspawn: the host's init)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := _proc_stat(int(d.name))) and st[1] == pid:
            out.append(PidRecord(int(d.name), st[2]))
    return out


def _wait_gone(recs: Iterable[PidRecord | None], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    recs = [r for r in recs if r is not None]
    while any(_alive(r) for r in recs):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _spawn_detached(
    argv: Sequence[str], pidfile: Path, logfile: Path, env: dict[str, str] | None = None
) -> PidRecord:
    """Start ``argv`` in a new session (``setsid -f``), not as our child; record its PID.

    Not being our child matters: a child that exits stays a zombie until its parent reaps it.
    """
    pidfile.unlink(missing_ok=True)
    wrapper = 'echo $$ > "$0.tmp" && mv "$0.tmp" "$0" && exec "$@"'
    with open(logfile, "ab") as out:
        subprocess.run(
            ["setsid", "-f", "/bin/sh", "-c", wrapper, str(pidfile), *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_tool_env(env),
            check=True,
        )
    deadline = time.monotonic() + 10
    while (rec := _read_pidfile(pidfile)) is None:
        if time.monotonic() > deadline:
            raise LabError(f"{argv[0]} did not start; see {logfile}")
        time.sleep(0.01)
    return _write_pidfile(pidfile, rec.pid)


# ------------------------------------------------------------------------------------------
# Tools, mirrors and the root file system images
# ------------------------------------------------------------------------------------------


def ensure_tools() -> list[str]:
    """apt-get install whatever of the lab's tools is missing; returns the packages installed."""
    wanted = {pkg for cmd, pkg in TOOLS.items() if _which(cmd) is None}
    wanted |= {pkg for path, pkg in TOOL_FILES.items() if not Path(path).exists()}
    missing = sorted(wanted)
    if missing:
        log.info("installing %s", " ".join(missing))
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        _run(["apt-get", "update", "-qq"], timeout=600, env=env)
        _run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
            timeout=900,
            env=env,
        )
    return missing


def _deb822_mirrors(text: str) -> list[str]:
    lines = []
    for para in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in para.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled") == "no":
            continue
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                lines.append(f"deb {uri} {suite} {fields.get('components', 'main')}")
    return lines


def apt_mirrors(etc_apt: Path = Path("/etc/apt")) -> list[str]:
    """The bookworm ``deb`` lines that apt uses on this machine (one-line or deb822 sources)."""
    found: list[str] = []
    files = [etc_apt / "sources.list", *sorted((etc_apt / "sources.list.d").glob("*"))]
    for f in files:
        if not f.is_file():
            continue
        if f.suffix == ".sources":
            found += _deb822_mirrors(f.read_text())
        elif f.suffix == ".list" or f.name == "sources.list":
            for line in f.read_text().splitlines():
                line = re.sub(r"\[[^\]]*\]\s*", "", line.split("#")[0]).strip()
                if line.startswith("deb "):
                    found.append(line)
    keep = [m for m in found if len(m.split()) >= 3 and m.split()[2] in MIRROR_SUITES]
    return list(dict.fromkeys(keep)) or list(FALLBACK_MIRRORS)


def image_packages(flavour: str) -> tuple[str, ...]:
    return BASE_PACKAGES + FLAVOUR_PACKAGES[flavour]


def image_id(flavour: str, mirrors: Sequence[str] | None = None) -> str:
    """Content id of a root file system: recipe revision, packages, mirrors, baked-in files."""
    content = {
        "revision": IMAGE_REVISION,
        "suite": SUITE,
        "packages": image_packages(flavour),
        "mirrors": list(mirrors if mirrors is not None else apt_mirrors()),
        "files": [UPTIME_UNIT, CGROUP_RW_UNIT, CGROUP_RW_SCRIPT, SSHD_CONFIG],
        "timers": DISABLED_TIMERS,
    }
    return sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]


def image_dir(flavour: str, cache_dir: Path = CACHE_DIR) -> Path:
    return Path(cache_dir) / f"rootfs-{flavour}-{image_id(flavour)}"


def build_rootfs(flavour: str = "docker", cache_dir: Path = CACHE_DIR) -> Path:
    """The cached bookworm root file system for ``flavour``, built with mmdebstrap if missing.

    Builds are serialized by a lock file in ``cache_dir``; concurrent callers wait and reuse.
    """
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour {flavour!r}: one of {', '.join(FLAVOURS)}")
    cache_dir = Path(cache_dir)
    mirrors = apt_mirrors()
    dest = cache_dir / f"rootfs-{flavour}-{image_id(flavour, mirrors)}"
    ready = dest.with_name(dest.name + ".ready")
    if ready.exists():
        return dest
    with file_lock(cache_dir / ".rootfs.lock"):
        if ready.exists():
            return dest
        _remove_stale_builds(cache_dir)
        tmp = dest.with_name(f"{dest.name}.tmp.{os.getpid()}")
        t0 = time.monotonic()
        log.info("mmdebstrap %s (%s) -> %s", SUITE, flavour, dest)
        try:
            _mmdebstrap(tmp, image_packages(flavour), mirrors)
            _customize_rootfs(tmp)
        except BaseException:
            _rmtree(tmp)
            raise
        _rmtree(dest)
        os.rename(tmp, dest)
        info = {"flavour": flavour, "seconds": round(time.monotonic() - t0, 1), "at": _now_iso()}
        _write_atomic(ready, json.dumps(info) + "\n")
        log.info("rootfs %s built in %.1fs", dest.name, info["seconds"])
    return dest


def _remove_stale_builds(cache_dir: Path) -> None:
    """Half-built trees from interrupted builds (we hold the build lock, so none is live)."""
    for d in cache_dir.glob("rootfs-*.tmp.*"):
        _rmtree(d)


def _mmdebstrap(target: Path, packages: Sequence[str], mirrors: Sequence[str]) -> None:
    argv = [
        "mmdebstrap",
        "--quiet",
        "--mode=root",
        "--variant=minbase",
        f"--include={','.join(packages)}",
        '--aptopt=Acquire::Retries "3"',
        SUITE,
        str(target),
        *mirrors,
    ]
    _run(argv, timeout=1800)


def _customize_rootfs(root: Path) -> None:
    """Once per image: no host keys, empty machine-id, quiet apt timers, lab units, deploy user."""
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/hostname").unlink(missing_ok=True)
    (root / "etc/machine-id").write_text("")
    for timer in DISABLED_TIMERS:
        (root / f"etc/systemd/system/timers.target.wants/{timer}.timer").unlink(missing_ok=True)
    (root / "etc/ssh/sshd_config.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/ssh/sshd_config.d/gpufleet-lab.conf").write_text(SSHD_CONFIG)
    units = root / "etc/systemd/system"
    wants = units / "sysinit.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    for name, text in (
        ("gpufleet-lab-uptime.service", UPTIME_UNIT),
        ("gpufleet-lab-cgroup-rw.service", CGROUP_RW_UNIT),
    ):
        (units / name).write_text(text)
        (wants / name).symlink_to(f"../{name}")
    script = root / "usr/local/sbin/gpufleet-lab-cgroup-rw"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(CGROUP_RW_SCRIPT)
    script.chmod(0o755)
    (root / "root/.ssh").mkdir(mode=0o700, exist_ok=True)
    _run(["chroot", str(root), "useradd", "-m", "-s", "/bin/bash", "-G", "sudo", "deploy"])
    _run(["chroot", str(root), "install", "-d", "-m700", "-o", "deploy", "-g", "deploy",
          "/home/deploy/.ssh"])  # fmt: skip
    sudoers = root / "etc/sudoers.d/deploy"
    sudoers.write_text("deploy ALL=(ALL) NOPASSWD:ALL\n")
    sudoers.chmod(0o440)
    (root / "var/lib/lxcfs").mkdir(parents=True, exist_ok=True)


# ------------------------------------------------------------------------------------------
# Machine-wide pieces of a lab: sysctls, SSH key, bridge + NAT, lxcfs
# ------------------------------------------------------------------------------------------


def _tune_sysctls() -> None:
    """Every booted systemd takes inotify instances; the default 128 stops at about 18 hosts."""
    for key, want in (
        ("fs.inotify.max_user_instances", 8192),
        ("fs.inotify.max_user_watches", 1048576),
    ):
        path = Path("/proc/sys") / key.replace(".", "/")
        if int(path.read_text()) < want:
            path.write_text(str(want))


def ensure_ssh_key(cfg: LabConfig) -> Path:
    """The lab's SSH key ``<state>/id_ed25519`` (generated once); returns its path."""
    if not cfg.ssh_key.exists():
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"gpufleet-lab-{cfg.prefix}",
              "-f", str(cfg.ssh_key)])  # fmt: skip
    return cfg.ssh_key


def _ipt_rules(cfg: LabConfig) -> list[tuple[str, list[str]]]:
    """(table, rule) pairs this lab adds; each carries the lab's comment."""
    tag = ["-m", "comment", "--comment", cfg.rule_comment]
    rules = [
        ("nat", ["POSTROUTING", "-s", f"{net}.0/24", "!", "-o", cfg.bridge, "-j", "MASQUERADE"])
        for net in (cfg.subnet, cfg.private_subnet)
    ]
    rules += [("filter", ["FORWARD", flag, cfg.bridge, "-j", "ACCEPT"]) for flag in ("-i", "-o")]
    return [(table, [*rule[:-2], *tag, *rule[-2:]]) for table, rule in rules]


def _net_up(cfg: LabConfig) -> None:
    """The bridge with both gateway addresses, IP forwarding and NAT out of both subnets."""
    if _run(["ip", "link", "show", cfg.bridge], check=False).returncode != 0:
        _run(["ip", "link", "add", cfg.bridge, "type", "bridge"])
    addrs = _run(["ip", "-o", "-4", "addr", "show", "dev", cfg.bridge]).stdout
    for ip in (cfg.bridge_ip, cfg.private_bridge_ip):
        if f" {ip}/24 " not in addrs:
            _run(["ip", "addr", "add", f"{ip}/24", "dev", cfg.bridge])
    _run(["ip", "link", "set", cfg.bridge, "up"])
    with file_lock(cfg.state_root / ".net.lock"):
        saved = cfg.state_root / "ip_forward.orig"
        forward = Path("/proc/sys/net/ipv4/ip_forward")
        if not saved.exists():
            _write_atomic(saved, forward.read_text())
        forward.write_text("1")
        _write_atomic(cfg.state_dir / "net.json", json.dumps({"bridge": cfg.bridge}) + "\n")
    for table, rule in _ipt_rules(cfg):
        if _run(["iptables", "-w", "-t", table, "-C", *rule], check=False).returncode != 0:
            _run(["iptables", "-w", "-t", table, "-A", *rule])


def _net_down(cfg: LabConfig) -> None:
    """Remove this lab's rules (by comment), bridge and forwarding state; idempotent."""
    for table in ("nat", "filter"):
        listing = _run(["iptables", "-w", "-t", table, "-S"], check=False).stdout
        for line in listing.splitlines():
            words = shlex.split(line)
            if words[:1] == ["-A"] and _has_comment(words, cfg.rule_comment):
                _run(["iptables", "-w", "-t", table, "-D", *words[1:]], check=False)
    _run(["ip", "link", "del", cfg.bridge], check=False)
    with file_lock(cfg.state_root / ".net.lock"):
        (cfg.state_dir / "net.json").unlink(missing_ok=True)
        others = list(cfg.state_root.glob("*/net.json"))
        saved = cfg.state_root / "ip_forward.orig"
        if not others and saved.exists():
            Path("/proc/sys/net/ipv4/ip_forward").write_text(saved.read_text().strip())
            saved.unlink()


def _has_comment(words: list[str], comment: str) -> bool:
    return any(w == "--comment" and words[i + 1] == comment for i, w in enumerate(words[:-1]))


def _is_mountpoint(path: Path) -> bool:
    return any(m == path for m in _mounts_under(path))


def _mounts_under(path: Path) -> list[Path]:
    """Mount points at or below ``path``, deepest first."""
    base = str(path.resolve(strict=False)) if path.exists() else str(path)
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        mp = line.split()[1].encode().decode("unicode_escape")
        if mp == base or mp.startswith(base.rstrip("/") + "/"):
            found.append(Path(mp))
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def _unmount_all(path: Path) -> None:
    for mp in _mounts_under(path):
        if _run(["umount", str(mp)], check=False).returncode != 0:
            _run(["umount", "-l", str(mp)], check=False)


def _rmtree(path: Path) -> None:
    """``rm -rf`` that never descends into a mount (a killed mmdebstrap leaves /dev, /sys...)."""
    if not path.exists():
        return
    _unmount_all(path)
    if left := _mounts_under(path):
        raise LabError(f"not removing {path}: still mounted: {', '.join(map(str, left))}")
    shutil.rmtree(path, ignore_errors=True)


def _lxcfs_up(cfg: LabConfig) -> None:
    """This lab's lxcfs (per-host /proc/uptime), started once and recorded by PID."""
    pidfile = cfg.state_dir / "lxcfs.pid"
    if _alive(_read_pidfile(pidfile)) and (cfg.lxcfs_dir / "proc/uptime").exists():
        return
    _lxcfs_down(cfg)
    cfg.lxcfs_dir.mkdir(parents=True, exist_ok=True)
    argv = ["lxcfs", "-f", "-p", str(cfg.state_dir / "lxcfs.daemon.pid"), str(cfg.lxcfs_dir)]
    _spawn_detached(argv, pidfile, cfg.state_dir / "lxcfs.log")
    deadline = time.monotonic() + 10
    while not (cfg.lxcfs_dir / "proc/uptime").exists():
        if time.monotonic() > deadline:
            raise LabError(f"lxcfs did not come up; see {cfg.state_dir / 'lxcfs.log'}")
        time.sleep(0.05)


def _lxcfs_down(cfg: LabConfig) -> None:
    rec = _read_pidfile(cfg.state_dir / "lxcfs.pid")
    _kill(rec, signal.SIGTERM)
    if not _wait_gone([rec], 5):
        _kill(rec, signal.SIGKILL)
        _wait_gone([rec], 5)
    _unmount_all(cfg.lxcfs_dir)
    (cfg.state_dir / "lxcfs.pid").unlink(missing_ok=True)
    (cfg.state_dir / "lxcfs.daemon.pid").unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------
# Cgroups: each host in its own cgroup in every hierarchy (below ours)
# ------------------------------------------------------------------------------------------

CGROUP_FS = Path("/sys/fs/cgroup")


def cgroup_mode() -> str:
    """``v1`` on a hybrid machine with v1 controllers (like this CI), else ``v2``."""
    return "v1" if (CGROUP_FS / "unified").is_dir() and (CGROUP_FS / "memory").is_dir() else "v2"


def _cgroup_parents(cfg: LabConfig) -> list[Path]:
    """This lab's ``<prefix>lab`` cgroup in every hierarchy, below our own cgroup in it."""
    hybrid = (CGROUP_FS / "unified").is_dir()
    v1 = cgroup_mode() == "v1"
    out = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _hid, ctrls, path = line.split(":", 2)
        if ctrls == "":
            root = CGROUP_FS / "unified" if hybrid else CGROUP_FS
        elif ctrls.startswith("name="):
            root = CGROUP_FS / ctrls[len("name=") :]
        elif v1:
            root = CGROUP_FS / ctrls
        else:
            continue
        if root.is_dir():
            out.append(root / path.lstrip("/") / cfg.cgroup_name)
    return out


def _copy_cpuset(child: Path) -> None:
    """v1 cpuset cgroups start with no CPUs and no memory nodes: inherit the parent's."""
    for f in ("cpuset.cpus", "cpuset.mems"):
        if (child / f).exists() and not (child / f).read_text().strip():
            (child / f).write_text((child.parent / f).read_text())


def _cgroups_create(cfg: LabConfig, machine: str) -> list[Path]:
    dirs = []
    for parent in _cgroup_parents(cfg):
        for d in (parent, parent / machine):
            d.mkdir(exist_ok=True)
            _copy_cpuset(d)
        dirs.append(parent / machine)
    return dirs


def _rmdir_tree(top: Path, timeout: float = 5) -> bool:
    """rmdir a cgroup and its sub-cgroups, deepest first (they empty out asynchronously)."""
    deadline = time.monotonic() + timeout
    while top.exists():
        for dirpath, _dirs, _files in os.walk(top, topdown=False):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)
        if top.exists():
            if time.monotonic() > deadline:
                log.warning("cgroup %s is still busy", top)
                return False
            time.sleep(0.1)
    return True


# ------------------------------------------------------------------------------------------
# One host: its directory, disk, network, supervisor
# ------------------------------------------------------------------------------------------


class HostDir:
    """Paths of one host's state directory."""

    def __init__(self, cfg: LabConfig, machine: str) -> None:
        self.root = cfg.hosts_dir / machine
        self.upper = self.root / "upper"
        self.work = self.root / "work"
        self.merged = self.root / "merged"
        self.docker = self.root / "docker"
        self.containerd = self.root / "containerd"
        self.console = self.root / "console.log"
        self.supervisor_pid = self.root / "supervisor.pid"
        self.nspawn_pid = self.root / "nspawn.pid"
        self.spec = self.root / "supervisor.json"
        self.cgroups = self.root / "cgroups.json"
        self.record = self.root / "host.json"
        self.known_hosts = self.root / "known_hosts"

    def supervisor(self) -> PidRecord | None:
        return _read_pidfile(self.supervisor_pid)

    def nspawn(self) -> PidRecord | None:
        return _read_pidfile(self.nspawn_pid)

    def running(self) -> bool:
        return _alive(self.supervisor()) or _alive(self.nspawn())

    def console_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.console.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no console log)"


def _hosts_file(host: LabHost) -> str:
    return (
        "127.0.0.1\tlocalhost\n"
        f"127.0.1.1\t{host.droplet_name}\n"
        "::1\t\tlocalhost ip6-localhost ip6-loopback\n"
        "ff02::1\t\tip6-allnodes\n"
        "ff02::2\t\tip6-allrouters\n"
    )


def daemon_json(cfg: LabConfig) -> str:
    """The /etc/docker/daemon.json a lab host starts with (like an image with settings)."""
    registry = f"{cfg.bridge_ip}:{REGISTRY_PORT}"
    data = {
        "log-driver": "json-file",
        "log-opts": {"max-size": "10m", "max-file": "3"},
        "registry-mirrors": [f"http://{registry}"],
        "insecure-registries": [registry],
    }
    return json.dumps(data, indent=2) + "\n"


def _write_into(
    root: Path, rel: str, text: str, mode: int = 0o644, owner: Path | None = None
) -> None:
    """Write a file into a host's root fs; ``owner``: copy uid/gid from that path."""
    p = _inside(root, rel)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    p.chmod(mode)
    if owner is not None:
        st = owner.stat()
        os.chown(p, st.st_uid, st.st_gid)


def _seed_root(cfg: LabConfig, host: LabHost, root: Path, keep_settings: bool = False) -> str:
    """Per-host files of a fresh disk; returns the new host key (``ssh-ed25519 AAAA...``).
    ``keep_settings``: a disk from a snapshot keeps its docker settings (only what a new droplet
    always gets anew is written: name, machine-id, authorized key, host key, the GPU)."""
    pub = cfg.ssh_key.with_suffix(".pub").read_text()
    _write_into(root, "etc/hostname", host.droplet_name + "\n")
    _write_into(root, "etc/hosts", _hosts_file(host))
    _write_into(root, "etc/machine-id", uuid.uuid4().hex + "\n", 0o444)
    _write_into(root, "root/.ssh/authorized_keys", pub, 0o600)
    deploy_home = _inside(root, "home/deploy/.ssh")
    if deploy_home.is_dir():
        _write_into(root, "home/deploy/.ssh/authorized_keys", pub, 0o600, owner=deploy_home)
    if not keep_settings:
        _write_into(root, "etc/docker/daemon.json", daemon_json(cfg))
    profiles.install_profile(host.profile, root)
    key = _inside(root, "etc/ssh/ssh_host_ed25519_key")
    for old in key.parent.glob("ssh_host_*"):
        old.unlink()
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{host.droplet_name}",
          "-f", str(key)])  # fmt: skip
    return " ".join(key.with_suffix(".pub").read_text().split()[:2])


def _seed_var_lib(image: Path, hd: HostDir) -> None:
    """/var/lib/docker and /var/lib/containerd start as they are in the image."""
    for name, dest in (("docker", hd.docker), ("containerd", hd.containerd)):
        src = image / "var/lib" / name
        if src.is_dir() and any(src.iterdir()):
            shutil.copytree(src, dest, symlinks=True, dirs_exist_ok=True)


def _mount_overlay(image: Path, hd: HostDir) -> None:
    if not _is_mountpoint(hd.merged):
        opts = f"lowerdir={image},upperdir={hd.upper},workdir={hd.work}"
        _run(["mount", "-t", "overlay", "overlay", "-o", opts, str(hd.merged)])


SNAPSHOT_PARTS = ("upper", "docker", "containerd")  # a host's disk, as HostDir names them


def snapshot_dir(cfg: LabConfig, snapshot_id: int) -> Path:
    return cfg.state_dir / "snapshots" / str(snapshot_id)


def _copy_tree(src: Path, dest: Path) -> None:
    """``cp -a`` (owners, modes, xattrs, overlay whiteouts and opaque dirs kept)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    _run(["cp", "-a", "--reflink=auto", str(src), str(dest)], timeout=900)


def _provision(cfg: LabConfig, host: LabHost, image: Path,
               snapshot: Path | None = None) -> str:
    """A fresh disk for ``host`` (its old one wiped), from the image or from a snapshot's
    disk; returns the new host key."""
    hd = HostDir(cfg, host.machine)
    _rmtree(hd.root)
    hd.root.mkdir(parents=True)
    if snapshot is not None:
        for part in SNAPSHOT_PARTS:
            _copy_tree(snapshot / part, hd.root / part)
    for d in (hd.upper, hd.work, hd.merged, hd.docker, hd.containerd):
        d.mkdir(parents=True, exist_ok=True)
    hd.docker.chmod(0o711)
    hd.containerd.chmod(0o711)
    if snapshot is None:
        _seed_var_lib(image, hd)
    _mount_overlay(image, hd)
    key = _seed_root(cfg, host, hd.merged, keep_settings=snapshot is not None)
    _write_atomic(hd.known_hosts, "".join(_known_hosts_lines(host, key)))
    record = {**host.to_record(), "image": str(image), "created_at": _now_iso(), "host_key": key}
    _write_atomic(hd.record, json.dumps(record, indent=2) + "\n")
    return key


def _host_net_up(cfg: LabConfig, host: LabHost) -> None:
    """Netns ``<machine>``, veth ``<prefix>v<i>`` on the bridge, eth0 with both addresses."""
    _host_net_down(cfg, host.index)
    ns, veth = host.machine, cfg.veth(host.index)
    _run(["ip", "netns", "add", ns])
    mac = cfg.mac(host.index)
    _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "address", mac,
          "netns", ns])  # fmt: skip
    _run(["ip", "link", "set", veth, "master", cfg.bridge, "up"])
    for ip in (host.public_ip, host.private_ip):  # no stale ARP entry from a previous boot
        _run(["ip", "neigh", "flush", "to", ip, "dev", cfg.bridge], check=False)
    for ip in (host.public_ip, host.private_ip):
        _run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0"])
    _run(["ip", "-n", ns, "link", "set", "lo", "up"])
    _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
    _run(["ip", "-n", ns, "route", "add", "default", "via", cfg.bridge_ip])
    # docker wants forwarding on; the host's /proc/sys is writable only for net, so set it here
    _run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])


def _host_net_down(cfg: LabConfig, index: int) -> None:
    _run(["ip", "netns", "del", cfg.machine(index)], check=False)
    _run(["ip", "link", "del", cfg.veth(index)], check=False)


def _nspawn_env() -> dict[str, str]:
    return {
        # v1 mode: legacy hierarchies inside, so docker's --memory/--cpus/--pids-limit work
        "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "0" if cgroup_mode() == "v1" else "1",
        "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "network",  # docker writes /proc/sys/net/...
        "SYSTEMD_SECCOMP": "0",
        "SYSTEMD_NSPAWN_LOCK": "0",  # we keep hosts apart ourselves; no lock files left behind
    }


def _nspawn_argv(cfg: LabConfig, host: LabHost, hd: HostDir) -> list[str]:
    return [
        "systemd-nspawn",
        "--quiet",
        "--directory",
        str(hd.merged),
        "--machine",
        host.machine,
        "--boot",
        f"--network-namespace-path=/run/netns/{host.machine}",
        "--register=no",
        "--keep-unit",
        "--console=passive",
        "--link-journal=no",
        "--resolv-conf=copy-host",
        "--capability=all",
        f"--bind={hd.docker}:/var/lib/docker",
        f"--bind={hd.containerd}:/var/lib/containerd",
        # nspawn cannot bind a single lxcfs file ("Failed to stat"); the directory binds fine
        f"--bind-ro={cfg.lxcfs_dir}:/var/lib/lxcfs",
    ]


def _start(cfg: LabConfig, host: LabHost, image: Path) -> None:
    """Mount the disk, wire the network, place cgroups and start the host's supervisor."""
    hd = HostDir(cfg, host.machine)
    _mount_overlay(image, hd)
    _host_net_up(cfg, host)
    cgroups = _cgroups_create(cfg, host.machine)
    _write_atomic(hd.cgroups, json.dumps([str(c) for c in cgroups]) + "\n")
    spec = {
        "machine": host.machine,
        "argv": _nspawn_argv(cfg, host, hd),
        "env": _nspawn_env(),
        "cgroups": [str(c) for c in cgroups],
        "nspawn_pid": str(hd.nspawn_pid),
    }
    _write_atomic(hd.spec, json.dumps(spec, indent=2) + "\n")
    hd.nspawn_pid.unlink(missing_ok=True)
    pythonpath = [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in pythonpath if p)}
    argv = [sys.executable, "-m", "gpufleet_lab.hosts", "_supervise", str(hd.root)]
    _spawn_detached(argv, hd.supervisor_pid, hd.console, env)


def _stop(cfg: LabConfig, hd: HostDir, *, hard: bool) -> None:
    """Stop a host: TERM its supervisor (clean poweroff), or KILL; only recorded PIDs."""
    sup, nsp = hd.supervisor(), hd.nspawn()
    if not hard and (_alive(sup) or _alive(nsp)):
        _kill(sup if _alive(sup) else nsp, signal.SIGTERM)  # nspawn -> SIGRTMIN+3 -> poweroff
        if _wait_gone([sup, nsp], cfg.stop_timeout):
            return
        log.warning("%s: no clean poweroff in %ss, killing it", hd.root.name, cfg.stop_timeout)
    _kill(sup, signal.SIGKILL)  # first, so it does not boot the host again
    if _alive(nsp):
        assert nsp is not None
        for child in _children(nsp.pid):  # the host's init: its whole PID namespace goes
            _kill(child, signal.SIGKILL)
        if not _wait_gone([nsp], 5):
            _kill(nsp, signal.SIGKILL)
    if not _wait_gone([sup, nsp], 5):
        raise LabError(f"{hd.root.name}: processes {sup} {nsp} did not exit")


def _nspawn_leftovers(machine: str) -> None:
    for d in ("propagate", "unix-export"):
        path = Path("/run/systemd/nspawn") / d / machine
        _rmtree(path)


def _cleanup(cfg: LabConfig, index: int, hd: HostDir, *, keep_disk: bool) -> None:
    """After a stop: leftovers of nspawn, the network, cgroups; the disk too unless kept."""
    machine = cfg.machine(index)
    _nspawn_leftovers(machine)
    _host_net_down(cfg, index)
    try:
        cgroups = [Path(c) for c in json.loads(hd.cgroups.read_text())]
    except FileNotFoundError:
        cgroups = [p / machine for p in _cgroup_parents(cfg)]
    for cg in cgroups:
        _rmdir_tree(cg)
    hd.cgroups.unlink(missing_ok=True)
    if not keep_disk:
        _rmtree(hd.root)


# ------------------------------------------------------------------------------------------
# Waiting for a host
# ------------------------------------------------------------------------------------------


def _ssh_banner(ip: str, timeout: float = 1.0) -> bool:
    """True when sshd at ``ip`` answers with its SSH banner."""
    try:
        with socket.create_connection((ip, 22), timeout=timeout) as s:
            s.settimeout(timeout)
            return s.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def ssh_argv(
    cfg: LabConfig,
    host: LabHost,
    *,
    known_hosts: Path | None = None,
    user: str = "root",
    ip: str | None = None,
) -> list[str]:
    """``ssh`` with the lab key and strict host key checking against ``known_hosts``."""
    return [
        "ssh",
        "-F",
        "/dev/null",
        "-i",
        str(cfg.ssh_key),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        f"UserKnownHostsFile={known_hosts or cfg.known_hosts}",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "ConnectTimeout=5",
        "-o",
        "LogLevel=ERROR",
        f"{user}@{ip or host.public_ip}",
    ]


def _wait_ssh(cfg: LabConfig, host: LabHost, deadline: float) -> None:
    hd = HostDir(cfg, host.machine)
    while not _ssh_banner(host.public_ip, 0.5):
        if not hd.running():
            raise LabError(f"{host.machine} stopped while booting:\n{hd.console_tail()}")
        if time.monotonic() > deadline:
            raise LabError(f"{host.machine}: no sshd on {host.public_ip}:22:\n{hd.console_tail()}")
        time.sleep(0.1)


def _wait_running(cfg: LabConfig, host: LabHost, deadline: float) -> None:
    """``systemctl is-system-running --wait`` must say ``running`` (no failed units)."""
    hd = HostDir(cfg, host.machine)
    ssh = ssh_argv(cfg, host, known_hosts=hd.known_hosts)
    left = max(5.0, deadline - time.monotonic())
    r = _run([*ssh, "systemctl", "is-system-running", "--wait"], check=False, timeout=left)
    if r.stdout.strip() != "running":
        failed = _run([*ssh, "systemctl", "--failed", "--no-legend", "--plain"], check=False)
        raise LabError(
            f"{host.machine}: system is {r.stdout.strip() or r.stderr.strip()!r}; "
            f"failed units: {failed.stdout.strip() or '?'}"
        )


def _wait_ready(cfg: LabConfig, host: LabHost) -> None:
    deadline = time.monotonic() + cfg.boot_timeout
    _wait_ssh(cfg, host, deadline)
    _wait_running(cfg, host, deadline)


# ------------------------------------------------------------------------------------------
# lab.json and known_hosts
# ------------------------------------------------------------------------------------------


def update_lab_json(cfg: LabConfig, mutate: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Read-modify-write ``lab.json`` under ``lab.json.lock`` (atomic replace); returns it."""
    with file_lock(cfg.state_dir / "lab.json.lock"):
        try:
            data = json.loads(cfg.lab_json.read_text())
        except FileNotFoundError:
            data = {}
        mutate(data)
        _write_atomic(cfg.lab_json, json.dumps(data, indent=2) + "\n")
    return data


def _lab_keys(cfg: LabConfig) -> dict[str, Any]:
    return {
        "prefix": cfg.prefix,
        "subnet": cfg.subnet,
        "public_network": f"{cfg.subnet}.0/24",
        "private_network": f"{cfg.private_subnet}.0/24",
        "bridge": cfg.bridge,
        "bridge_ip": cfg.bridge_ip,
        "private_bridge_ip": cfg.private_bridge_ip,
        "state_dir": str(cfg.state_dir),
        "ssh_key": str(cfg.ssh_key),
        "known_hosts": str(cfg.known_hosts),
    }


def _record_hosts(cfg: LabConfig, records: Sequence[dict[str, Any]]) -> None:
    """Merge host records into lab.json by index (other hosts and other keys are kept)."""

    def mutate(data: dict[str, Any]) -> None:
        data.update(_lab_keys(cfg))
        by_index = {int(h["index"]): h for h in data.get("hosts", [])}
        by_index.update({int(r["index"]): r for r in records})
        data["hosts"] = [by_index[i] for i in sorted(by_index)]

    update_lab_json(cfg, mutate)


def load_hosts(cfg: LabConfig) -> list[LabHost]:
    """The hosts recorded in lab.json (empty if there is none)."""
    try:
        data = json.loads(cfg.lab_json.read_text())
    except FileNotFoundError:
        return []
    return [LabHost.from_record(h) for h in data.get("hosts", [])]


def _host(cfg: LabConfig, index: int) -> LabHost:
    for h in load_hosts(cfg):
        if h.index == index:
            return h
    raise LabError(f"lab {cfg.prefix!r} has no host {index} (lab.json: {cfg.lab_json})")


def _known_hosts_lines(host: LabHost, key: str) -> list[str]:
    return [f"{ip} {key}\n" for ip in (host.public_ip, host.private_ip)]


def trust_host_key(cfg: LabConfig, host: LabHost, key: str) -> None:
    """Replace ``host``'s entries in the lab's known_hosts with ``key`` (both its IPs)."""
    _update_known_hosts(cfg, {host: key})


def _update_known_hosts(cfg: LabConfig, keys: dict[LabHost, str]) -> None:
    ips = {ip for h in keys for ip in (h.public_ip, h.private_ip)}
    with file_lock(cfg.state_dir / "known_hosts.lock"):
        try:
            old = cfg.known_hosts.read_text().splitlines(keepends=True)
        except FileNotFoundError:
            old = []
        kept = [line for line in old if not set(line.split(" ", 1)[0].split(",")) & ips]
        new = [line for h, k in keys.items() for line in _known_hosts_lines(h, k)]
        _write_atomic(cfg.known_hosts, "".join(kept + new))


# ------------------------------------------------------------------------------------------
# Public operations
# ------------------------------------------------------------------------------------------


def _parallel(fn: Callable[[LabHost], Any], hosts: Sequence[LabHost]) -> list[Any]:
    """``fn`` over hosts in threads (at most 8); the first exception is raised."""
    if len(hosts) <= 1:
        return [fn(h) for h in hosts]
    with ThreadPoolExecutor(max_workers=min(8, len(hosts))) as pool:
        return list(pool.map(fn, hosts))


def _prepare_lab(cfg: LabConfig) -> None:
    """Machine-wide pieces every host needs: tools, sysctls, key, bridge/NAT, lxcfs."""
    ensure_tools()
    _tune_sysctls()
    ensure_ssh_key(cfg)
    _net_up(cfg)
    _lxcfs_up(cfg)


def boot(cfg: LabConfig, hosts: Sequence[LabHost]) -> list[LabHost]:
    """Boot ``hosts`` on fresh disks and wait until each is ``running``; returns them.

    Builds (or reuses) the images, brings up the bridge, NAT and lxcfs, starts the hosts in
    parallel, writes ``known_hosts`` (each key under the public and the private IP) and merges
    the hosts into ``lab.json``. A host that is already running is an error (``down`` first).
    On failure the lab is left as it is for inspection; ``down`` cleans it up.
    """
    if len({h.index for h in hosts}) != len(hosts):
        raise ValueError("host indexes must be unique")
    for h in hosts:
        if h.machine != cfg.machine(h.index) or h.public_ip != cfg.public_ip(h.index):
            raise ValueError(f"host {h.index} does not belong to lab {cfg.prefix!r}")
    with file_lock(cfg.state_dir / ".lock"):
        t0 = time.monotonic()
        _prepare_lab(cfg)
        images = {f: build_rootfs(f, cfg.cache_dir) for f in sorted({h.flavour for h in hosts})}
        busy = [h.machine for h in hosts if HostDir(cfg, h.machine).running()]
        if busy:
            raise LabError(f"already running: {', '.join(busy)} (run down first)")
        t1 = time.monotonic()

        def start(h: LabHost) -> str:
            key = _provision(cfg, h, images[h.flavour])
            _start(cfg, h, images[h.flavour])
            return key

        keys = _parallel(start, hosts)
        _update_known_hosts(cfg, dict(zip(hosts, keys, strict=True)))
        _record_hosts(cfg, [_host_record(cfg, h) for h in hosts])
        _parallel(lambda h: _wait_ready(cfg, h), hosts)
        log.info(
            "booted %d host(s) in %.1fs (prepare %.1fs)",
            len(hosts),
            time.monotonic() - t1,
            t1 - t0,
        )
    return list(hosts)


def _host_record(cfg: LabConfig, host: LabHost) -> dict[str, Any]:
    return json.loads(HostDir(cfg, host.machine).record.read_text())


def rebuild_host(cfg: LabConfig, index: int, snapshot_id: int | None = None) -> str:
    """Rebuild host ``index`` like a droplet rebuild: same name and IPs, a wiped disk.

    Stops the host, throws away its overlay upper dir and its docker/containerd dirs (back to
    the image, or to the disk of snapshot ``snapshot_id``), generates a new SSH host key and
    machine-id, boots it and waits for ``running``. The lab's known_hosts is NOT updated (a
    rebuilt droplet really has a new key): the new key (``ssh-ed25519 AAAA...``) is returned;
    ``trust_host_key`` records it.
    """
    with file_lock(cfg.state_dir / ".lock"):
        host = _host(cfg, index)
        hd = HostDir(cfg, host.machine)
        image = build_rootfs(host.flavour, cfg.cache_dir)
        snapshot = None
        if snapshot_id is not None:
            snapshot = snapshot_dir(cfg, snapshot_id)
            if not (snapshot / "done").is_file():
                raise LabError(f"snapshot {snapshot_id} has no disk in {snapshot}")
        _stop(cfg, hd, hard=False)
        _cleanup(cfg, index, hd, keep_disk=False)
        _prepare_lab(cfg)
        key = _provision(cfg, host, image, snapshot)
        _start(cfg, host, image)
        _record_hosts(cfg, [_host_record(cfg, host)])
        _wait_ready(cfg, host)
    return key


def snapshot_host(cfg: LabConfig, index: int, snapshot_id: int) -> int:
    """Copy host ``index``'s disk (overlay upper dir, docker and containerd dirs) as snapshot
    ``snapshot_id``; returns its size in bytes. A running host is copied as it is, like
    DigitalOcean's live snapshot (gpufleet powers a droplet off first)."""
    with file_lock(cfg.state_dir / ".lock"):
        host = _host(cfg, index)
        hd = HostDir(cfg, host.machine)
        dest = snapshot_dir(cfg, snapshot_id)
        _rmtree(dest)
        for part in SNAPSHOT_PARTS:
            _copy_tree(hd.root / part, dest / part)
        size = int(_run(["du", "-sb", str(dest)]).stdout.split()[0])
        (dest / "done").write_text(f"{host.droplet_name} {size}\n")
    return size


def power_off_host(cfg: LabConfig, index: int) -> None:
    """Stop host ``index`` (its supervisor ends its processes; the disk stays), as a droplet
    powered off. ``power_cycle_host`` boots it again."""
    with file_lock(cfg.state_dir / ".lock"):
        host = _host(cfg, index)
        hd = HostDir(cfg, host.machine)
        _stop(cfg, hd, hard=False)
        _cleanup(cfg, index, hd, keep_disk=True)
        _unmount_all(hd.merged)


def power_cycle_host(cfg: LabConfig, index: int) -> None:
    """Pull the plug on host ``index`` (SIGKILL, no shutdown) and boot it again, same disk."""
    with file_lock(cfg.state_dir / ".lock"):
        host = _host(cfg, index)
        hd = HostDir(cfg, host.machine)
        image = Path(_host_record(cfg, host)["image"])
        _stop(cfg, hd, hard=True)
        _cleanup(cfg, index, hd, keep_disk=True)
        _unmount_all(hd.merged)
        _prepare_lab(cfg)
        _start(cfg, host, image)
        _wait_ready(cfg, host)


def status(cfg: LabConfig) -> list[HostStatus]:
    """Each host in lab.json: whether its supervisor runs and whether sshd answers."""
    out = []
    for h in load_hosts(cfg):
        hd = HostDir(cfg, h.machine)
        sup, nsp = hd.supervisor(), hd.nspawn()
        running = _alive(sup) or _alive(nsp)
        out.append(
            HostStatus(
                host=h,
                running=running,
                ssh=running and _ssh_banner(h.public_ip, 0.5),
                supervisor_pid=sup.pid if _alive(sup) and sup else None,
                nspawn_pid=nsp.pid if _alive(nsp) and nsp else None,
            )
        )
    return out


def down(cfg: LabConfig) -> None:
    """Stop every host of this lab and remove everything it put on the machine.

    Processes (by recorded PID), mounts, netns, veths, the bridge, NAT/forward rules, cgroups,
    lxcfs and the host directories. lab.json keeps its other keys but its ``hosts`` list is
    emptied, known_hosts is emptied, the SSH key stays. Only this prefix's things are touched;
    running it twice is safe.
    """
    if not cfg.state_dir.exists():
        return
    with file_lock(cfg.state_dir / ".lock"):
        t0 = time.monotonic()
        dirs = sorted(cfg.hosts_dir.iterdir()) if cfg.hosts_dir.is_dir() else []

        def stop(d: Path) -> None:
            hd = HostDir(cfg, d.name)
            _stop(cfg, hd, hard=False)
            index = int(m.group(1)) if (m := re.fullmatch(rf"{cfg.prefix}h(\d+)", d.name)) else 0
            _cleanup(cfg, index, hd, keep_disk=False)

        if dirs:
            with ThreadPoolExecutor(max_workers=min(8, len(dirs))) as pool:
                list(pool.map(stop, dirs))
        _sweep(cfg)
        if cfg.lab_json.exists():
            update_lab_json(cfg, lambda data: data.update(hosts=[]))
        if cfg.known_hosts.exists():
            _write_atomic(cfg.known_hosts, "")
        log.info("lab %s down in %.1fs", cfg.prefix, time.monotonic() - t0)


def _sweep(cfg: LabConfig) -> None:
    """Remove this prefix's leftovers by their names (never processes)."""
    for ns in _run(["ip", "netns", "list"], check=False).stdout.split("\n"):
        name = ns.split(" ")[0]
        if re.fullmatch(rf"{cfg.prefix}h\d+", name):
            _run(["ip", "netns", "del", name], check=False)
    for line in _run(["ip", "-o", "link", "show"], check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if re.fullmatch(rf"{cfg.prefix}v\d+", name):
            _run(["ip", "link", "del", name], check=False)
    for parent in _cgroup_parents(cfg):
        if parent.exists():
            _rmdir_tree(parent)
    _lxcfs_down(cfg)
    _net_down(cfg)
    _unmount_all(cfg.state_dir)
    _rmtree(cfg.hosts_dir)
    with contextlib.suppress(OSError):
        cfg.lxcfs_dir.rmdir()


# ------------------------------------------------------------------------------------------
# The supervisor: one process per host, started detached by _start
# ------------------------------------------------------------------------------------------


def supervise(host_dir: Path) -> int:
    """Run one host's nspawn; boot it again whenever it exits with 133 (a reboot inside).

    SIGTERM/SIGINT are passed on to nspawn (which powers the host off cleanly) and end the loop.
    """
    spec = json.loads((host_dir / "supervisor.json").read_text())
    for cg in spec["cgroups"]:  # our own cgroups first, so nspawn nests below them
        Path(cg, "cgroup.procs").write_text(str(os.getpid()))
    env = {**os.environ, **spec["env"]}
    env.pop("PYTHONPATH", None)
    state: dict[str, Any] = {"stop": False, "child": None}

    def on_signal(signum: int, _frame: object) -> None:
        state["stop"] = True
        if state["child"] is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(state["child"], signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    rc = 0
    while not state["stop"]:
        child = subprocess.Popen(spec["argv"], env=env, stdin=subprocess.DEVNULL)
        state["child"] = child.pid
        _write_pidfile(Path(spec["nspawn_pid"]), child.pid)
        if state["stop"]:  # a signal that came before we knew the child's PID
            child.terminate()
        rc = child.wait()
        state["child"] = None
        _nspawn_leftovers(spec["machine"])
        if rc != NSPAWN_REBOOT:
            break
        print(f"[gpufleet-lab {time.strftime('%T')}] {spec['machine']} rebooting", flush=True)
    print(f"[gpufleet-lab {time.strftime('%T')}] {spec['machine']} exited: {rc}", flush=True)
    return rc


def _main(argv: Sequence[str]) -> int:
    if len(argv) == 2 and argv[0] == "_supervise":
        return supervise(Path(argv[1]))
    print("usage: python -m gpufleet_lab.hosts _supervise HOST_DIR (internal)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))


__all__ = [
    "FLAVOURS",
    "HostStatus",
    "LabConfig",
    "LabError",
    "LabHost",
    "apt_mirrors",
    "boot",
    "build_rootfs",
    "daemon_json",
    "default_droplet_id",
    "down",
    "ensure_ssh_key",
    "ensure_tools",
    "image_dir",
    "image_id",
    "load_hosts",
    "make_hosts",
    "power_cycle_host",
    "rebuild_host",
    "ssh_argv",
    "status",
    "trust_host_key",
    "update_lab_json",
]
