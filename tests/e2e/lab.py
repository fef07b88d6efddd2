"""Helpers for end-to-end tests against a lab: run pyinfra as the user does, ssh into hosts,
and bring hosts back to the state a test needs (see ``Converged``)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from gpufleet.model import names as host_paths
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


SERVICE = "llama3"


@dataclass(frozen=True)
class HostPrint:
    """What a deploy decides on a host, read back in one SSH command (see ``Lab.fingerprint``)."""

    files: str  # sha256 of the unit, the env file and the token file (or sha256sum's error)
    active: str  # ``systemctl is-active docker <unit>``
    daemon_json: str  # parsed and dumped with sorted keys: the same content reads the same
    staged: str  # the completion marker of the model and revision the unit pins

    @property
    def serving(self) -> bool:
        return self.active.split() == ["active", "active"]


_FINGERPRINT = "; ".join([
    f"sha256sum {host_paths.unit_path(SERVICE)} {host_paths.env_file(SERVICE)} "
    f"{host_paths.hf_token_file(SERVICE)} 2>&1",
    "echo --",
    f"systemctl is-active docker {host_paths.unit_name(SERVICE)}",
    "echo --",
    "python3 -c 'import json; print(json.dumps(json.load(open(\"/etc/docker/daemon.json\")), "
    "sort_keys=True))' 2>&1 | tail -n 1",
    "echo --",
    # the unit runs `vllm <model> --revision <commit> ...`: that model's marker for that commit
    f"set -- $(grep -o -- '[^ ]* --revision [0-9a-f]*' {host_paths.unit_path(SERVICE)} "
    "| head -n 1 | tr -d '\"')",
    'ls "/opt/models/hub/models--$(echo "$1" | sed "s|/|--|g")/.gpufleet/$3.complete" 2>&1',
])


@dataclass
class Lab:
    cfg: hosts.LabConfig
    env: dict[str, str]
    hosts: list[hosts.LabHost] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)  # every pyinfra run on this lab, in order

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
        run = Run(cmd, proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0)
        self.runs.append(run)
        return run

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

    def answering(self, name: str, timeout: float = 180) -> None:
        """Bring back a host that a failed test left unreachable: a rebuilt host's new key
        trusted, a cut link up again, a powered-off host booted (same disk)."""
        probe = self.ssh(name, "true", check=False, timeout=15)
        if probe.returncode == 0:
            return
        host = self.host(name)
        if "REMOTE HOST IDENTIFICATION HAS CHANGED" in probe.stderr:
            key = (self.host_root(name) / "merged/etc/ssh/ssh_host_ed25519_key.pub").read_text()
            hosts.trust_host_key(self.cfg, host, " ".join(key.split()[:2]))
        subprocess.run(["ip", "link", "set", self.cfg.veth(host.index), "up"],
                       capture_output=True)
        try:
            self.wait_ssh(name, timeout=20)
        except AssertionError:
            hosts.power_cycle_host(self.cfg, host.index)
            self.wait_ssh(name, timeout=timeout)

    def fingerprint(self, name: str) -> HostPrint:
        out = self.ssh(name, _FINGERPRINT, check=False).stdout
        parts = [p.strip() for p in out.split("\n--\n")]
        return HostPrint(*(parts + [""] * 4)[:4])


@dataclass
class Converged:
    """Hosts as a deploy left them: ``prints`` are their fingerprints right after ``first_run``.

    ``restore`` gives a test the hosts it needs in that state: hosts that drifted (a test
    changed them, or failed before it put them back) get the same deploy again, limited to
    them; hosts still as they were cost two SSH commands each."""

    lab: Lab
    first_run: Run
    extra_env: dict[str, str]
    prints: dict[str, HostPrint]

    def restore(self, names: Iterable[str] | None = None) -> None:
        wanted = list(names or self.prints)
        broken = [n for n in wanted if not self.prints[n].serving]
        assert not broken, (f"the first deploy did not converge {', '.join(broken)}:\n"
                            f"{self.first_run.output[-3000:]}")
        for name in wanted:
            self.lab.answering(name)
        drifted = [n for n in wanted if self.lab.fingerprint(n) != self.prints[n]]
        if not drifted:
            return
        run = self.lab.pyinfra(*[a for n in drifted for a in ("--limit", n)],
                               extra_env=self.extra_env)
        assert run.returncode == 0, f"restoring {drifted}:\n{run.output[-3000:]}"
        still = {n: self.lab.fingerprint(n) for n in drifted}
        assert all(still[n] == self.prints[n] for n in drifted), (still, self.prints)


def converge(lab: Lab, names: Iterable[str], *args: str,
             extra_env: dict[str, str] | None = None) -> Converged:
    """Run a deploy (``args``) and remember how it left ``names``."""
    env = dict(extra_env or {})
    run = lab.pyinfra(*args, extra_env=env)
    return Converged(lab, run, env, {n: lab.fingerprint(n) for n in names})


def start_lab(prefix: str, subnet: str, profile_names: list[str], engine: str = "standin") -> Lab:
    """A fresh lab. ``engine``: what serves behind the pinned image: the real vLLM (about 3 GiB
    and a minute's cold start per host) or the stand-in (scale and fault-injection tests)."""
    cfg = hosts.LabConfig(prefix=prefix, subnet=subnet)
    manager.down(cfg)
    env = manager.up(cfg, [manager.HostWish.parse(p) for p in profile_names], engine=engine)
    return Lab(cfg, env, hosts.load_hosts(cfg))


def quote(text: str) -> str:
    return shlex.quote(text)


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)
