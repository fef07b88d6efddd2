"""Helpers for end-to-end tests against a lab: run pyinfra as the user does, ssh into hosts."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from gpufleet_lab import hosts, manager

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def lab_available() -> str | None:
    """Why the lab cannot run here, or None."""
    if os.geteuid() != 0:
        return "the lab needs root"
    for tool in ("systemd-nspawn", "mmdebstrap", "iptables"):
        if not any((Path(d) / tool).exists() for d in os.environ.get("PATH", "").split(":")):
            return f"{tool} is not installed (see .ci/run)"
    return None


@dataclass
class Run:
    args: list[str]
    returncode: int
    output: str
    seconds: float

    def host_lines(self, host: str) -> list[str]:
        return [line for line in self.output.splitlines() if f"[{host}]" in line]

    def grand_total(self) -> list[str]:
        """The 'Grand total' row: ops, hosts... (success, error, no change columns)."""
        line = next(x for x in self.output.splitlines() if x.strip().startswith("Grand total"))
        return line.split()[2:]


@dataclass
class Lab:
    cfg: hosts.LabConfig
    env: dict[str, str]
    hosts: list[hosts.LabHost] = field(default_factory=list)

    def host(self, name: str) -> hosts.LabHost:
        return next(h for h in self.hosts if h.droplet_name == name)

    def pyinfra(self, *args: str, extra_env: dict[str, str] | None = None,
                timeout: float = 900) -> Run:
        cmd = [str(BIN / "pyinfra"), "-y", "inventories/do.py", "deploys/llama3.py", *args]
        env = {**os.environ, **self.env, **(extra_env or {}),
               "PATH": f"{BIN}:{os.environ.get('PATH', '')}", "COLUMNS": "200"}
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
        return Run(cmd, proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0)

    def ssh(self, name: str, command: str, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess:
        host = self.host(name)
        proc = subprocess.run(
            ["ssh", "-i", str(self.cfg.ssh_key), "-o", f"UserKnownHostsFile={self.cfg.known_hosts}",
             "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
             f"root@{host.public_ip}", command],
            capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{name}: {command!r} failed ({proc.returncode}): "
                                 f"{proc.stdout}{proc.stderr}")
        return proc

    def host_root(self, name: str) -> Path:
        return self.cfg.hosts_dir / self.host(name).machine

    def wait_ssh(self, name: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ssh(name, "true", check=False, timeout=10).returncode == 0:
                return
            time.sleep(1)
        raise AssertionError(f"{name}: no SSH after {timeout}s")


def start_lab(prefix: str, subnet: str, profile_names: list[str]) -> Lab:
    cfg = hosts.LabConfig(prefix=prefix, subnet=subnet)
    manager.down(cfg)
    env = manager.up(cfg, [manager.HostWish.parse(p) for p in profile_names])
    return Lab(cfg, env, hosts.load_hosts(cfg))


def quote(text: str) -> str:
    return shlex.quote(text)


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)
