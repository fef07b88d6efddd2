"""Lab stand-in: DigitalOcean cloud firewalls and load balancers made real on the lab network.

The DigitalOcean API emulator (``do_emulator``) keeps the API objects; it hands a
``NetworkPlan`` (what should be true on the network, fully resolved: CIDRs, member addresses)
to a ``Network`` every reconcile. ``LabNetwork`` makes it so:

* A firewall is iptables rules in the network namespace of every lab host it applies to
  (``ip netns exec <machine>``), in chains of our own in the ``mangle`` table:
  ``GPUFLEET-DOFW-IN`` hooked from ``PREROUTING -i eth0`` and ``GPUFLEET-DOFW-OUT`` hooked from
  ``POSTROUTING -o eth0``. ``mangle`` rather than ``filter`` because a DigitalOcean firewall sits
  outside the droplet: it must also see traffic to ports docker publishes (DNAT'ed in
  ``nat PREROUTING``, then FORWARDed, never INPUT) and traffic out of containers. Each chain lets
  ESTABLISHED,RELATED through, then one RETURN (allowed: carry on) per (protocol, ports, CIDR),
  then DROP. Loopback and docker's own bridge never pass eth0. A whole host's chains are
  replaced in one ``iptables-restore --noflush`` (atomic per table); a host no firewall applies
  to has no chain of ours.
* A load balancer is an HAProxy process in its own network namespace ``<prefix>lb<slot>``
  (veth ``<prefix>lbv<slot>`` on the lab bridge; eth0 with ``<subnet>.<200+slot>`` and
  ``<private subnet>.<200+slot>``). Members are added and removed through HAProxy's runtime
  API (a stats socket): a new server is added with weight 0, its checks enabled, taken out of
  maintenance, forced DOWN, then given weight 1, so it receives nothing before ``rise``
  consecutive passing checks (HAProxy 2.6 otherwise starts a server UP). A leaving server is
  set to ``drain`` (no new requests; requests in flight finish), then, once it has no
  connection left (or after the idle timeout), put in maintenance and deleted. A change of the
  LB's own settings is a graceful reload (a new process with ``-sf <old pid>``).

HAProxy processes are started detached and recorded by PID (and start time) in pid files under
``<state>/lb/``; they are only ever stopped by those PIDs.
"""

from __future__ import annotations

import contextlib
import ipaddress
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gpufleet_lab import hosts

CHAIN_IN = "GPUFLEET-DOFW-IN"
CHAIN_OUT = "GPUFLEET-DOFW-OUT"
HOOKS = (("PREROUTING", "-i", CHAIN_IN), ("POSTROUTING", "-o", CHAIN_OUT))
LB_FIRST_OCTET = 200  # LB slot n answers on .200+n of both lab subnets (hosts use .11-.109)
MAX_LB_SLOT = 54
SOCKET_TIMEOUT = 5.0

# --------------------------------------------------------------------------------------------
# The plan: what should be true on the network (pure data)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Allow:
    """Traffic one firewall rule lets through: ``ports`` "22", "8000-8010" or "0" (all)."""

    protocol: str
    ports: str
    cidr: str


@dataclass(frozen=True)
class HostFirewall:
    inbound: tuple[Allow, ...]
    outbound: tuple[Allow, ...]


@dataclass(frozen=True)
class ForwardingRule:
    entry_protocol: str
    entry_port: int
    target_protocol: str
    target_port: int
    tls_passthrough: bool = False

    @property
    def mode(self) -> str:
        """HAProxy's mode: TCP for tcp and TLS passthrough, HTTP for the rest."""
        if self.entry_protocol == "tcp" or self.tls_passthrough:
            return "tcp"
        return "http"


@dataclass(frozen=True)
class HealthCheck:
    protocol: str = "http"
    port: int = 80
    path: str = "/"
    check_interval_seconds: int = 10
    response_timeout_seconds: int = 5
    healthy_threshold: int = 3
    unhealthy_threshold: int = 5


@dataclass(frozen=True)
class Member:
    droplet_id: int
    address: str  # the droplet's private address: DigitalOcean LBs reach droplets in the VPC

    @property
    def server(self) -> str:
        return f"d{self.droplet_id}"


@dataclass(frozen=True)
class LbSpec:
    id: str
    slot: int
    public_ip: str
    private_ip: str
    forwarding_rules: tuple[ForwardingRule, ...]
    health_check: HealthCheck
    idle_timeout: int = 60
    proxy_protocol: bool = False
    members: tuple[Member, ...] = ()


@dataclass(frozen=True)
class NetworkPlan:
    """``firewalls``: lab host machine -> its rules, None for a host no firewall applies to."""

    firewalls: Mapping[str, HostFirewall | None] = field(default_factory=dict)
    lbs: tuple[LbSpec, ...] = ()


@dataclass(frozen=True)
class HostView:
    """A droplet as the resolution of firewall rules sees it."""

    droplet_id: int
    machine: str
    tags: frozenset[str]
    ips: tuple[str, ...]


class Network(Protocol):
    """What the emulator realizes its firewalls and load balancers through."""

    def lb_addresses(self, slot: int) -> tuple[str, str]:
        """(public, private) address of load balancer slot ``slot``."""
        ...

    def apply(self, plan: NetworkPlan) -> None:
        """Make the network match ``plan`` (called every reconcile; cheap when nothing changed)."""
        ...

    def lb_backends(self, lb_id: str) -> list[dict[str, Any]]:
        """``[{"droplet_id", "address", "status": healthy|unhealthy|draining}]``."""
        ...

    def close(self) -> None:
        """Remove everything ``apply`` made (load balancers; firewalls of live hosts)."""
        ...


# --------------------------------------------------------------------------------------------
# Resolving firewall rules to CIDRs
# --------------------------------------------------------------------------------------------


def _v4_cidr(address: str) -> str | None:
    net = ipaddress.ip_network(address, strict=False)
    return str(net) if net.version == 4 else None  # the lab has no IPv6


def _targets(
    ends: Mapping[str, Any],
    hosts_: Sequence[HostView],
    lb_ips: Mapping[str, tuple[str, ...]],
) -> list[str]:
    """The IPv4 CIDRs of one rule's ``sources`` or ``destinations``."""
    cidrs: list[str] = []
    for address in ends.get("addresses") or []:
        if (cidr := _v4_cidr(str(address))) is not None:
            cidrs.append(cidr)
    tags = set(ends.get("tags") or [])
    ids = {int(i) for i in ends.get("droplet_ids") or []}
    for h in hosts_:
        if h.droplet_id in ids or h.tags & tags:
            cidrs += [f"{ip}/32" for ip in h.ips]
    for uid in ends.get("load_balancer_uids") or []:
        cidrs += [f"{ip}/32" for ip in lb_ips.get(str(uid), ())]
    return list(dict.fromkeys(cidrs))


def _allows(rules: Iterable[Mapping[str, Any]], key: str, hosts_: Sequence[HostView],
            lb_ips: Mapping[str, tuple[str, ...]]) -> list[Allow]:
    out: list[Allow] = []
    for rule in rules:
        ports = "0" if rule["protocol"] == "icmp" else str(rule.get("ports") or "0")
        ports = "0" if ports == "all" else ports
        for cidr in _targets(rule.get(key) or {}, hosts_, lb_ips):
            out.append(Allow(str(rule["protocol"]), ports, cidr))
    return list(dict.fromkeys(out))


def resolve_firewalls(
    hosts_: Sequence[HostView],
    firewalls: Iterable[Mapping[str, Any]],
    lb_ips: Mapping[str, tuple[str, ...]],
) -> dict[str, HostFirewall | None]:
    """Every host's rules: the union over the firewalls that apply to it (by id or tag)."""
    firewalls = list(firewalls)
    plan: dict[str, HostFirewall | None] = {}
    for h in hosts_:
        applying = [
            fw for fw in firewalls
            if h.droplet_id in {int(i) for i in fw.get("droplet_ids") or []}
            or h.tags & set(fw.get("tags") or [])
        ]
        if not applying:
            plan[h.machine] = None
            continue
        inbound = _allows((r for fw in applying for r in fw["inbound_rules"]), "sources",
                          hosts_, lb_ips)
        outbound = _allows((r for fw in applying for r in fw["outbound_rules"]),
                           "destinations", hosts_, lb_ips)
        plan[h.machine] = HostFirewall(tuple(inbound), tuple(outbound))
    return plan


# --------------------------------------------------------------------------------------------
# iptables-restore text (pure)
# --------------------------------------------------------------------------------------------


def _match(allow: Allow, side: str) -> str:
    words = [side, allow.cidr, "-p", allow.protocol]
    if allow.protocol in ("tcp", "udp") and allow.ports != "0":
        words += ["-m", allow.protocol, "--dport", allow.ports.replace("-", ":")]
    return " ".join(words)


def _chain_lines(chain: str, allows: Sequence[Allow], side: str) -> list[str]:
    lines = [f"-A {chain} -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN"]
    lines += [f"-A {chain} {_match(a, side)} -j RETURN" for a in allows]
    lines.append(f"-A {chain} -j DROP")
    return lines


def iptables_restore_text(fw: HostFirewall, *, hook: bool) -> str:
    """``iptables-restore --noflush`` input that replaces our chains with ``fw`` (declaring a
    chain flushes it); ``hook``: also jump to them from PREROUTING/POSTROUTING (first time)."""
    lines = ["*mangle", f":{CHAIN_IN} - [0:0]", f":{CHAIN_OUT} - [0:0]"]
    if hook:
        lines += [f"-A {base} {flag} eth0 -j {chain}" for base, flag, chain in HOOKS]
    lines += _chain_lines(CHAIN_IN, fw.inbound, "-s")
    lines += _chain_lines(CHAIN_OUT, fw.outbound, "-d")
    return "\n".join([*lines, "COMMIT", ""])


def iptables_remove_text() -> str:
    """``iptables-restore --noflush`` input that unhooks and deletes our chains."""
    lines = ["*mangle"]
    lines += [f"-D {base} {flag} eth0 -j {chain}" for base, flag, chain in HOOKS]
    lines += [f"-F {CHAIN_IN}", f"-F {CHAIN_OUT}", f"-X {CHAIN_IN}", f"-X {CHAIN_OUT}"]
    return "\n".join([*lines, "COMMIT", ""])


# --------------------------------------------------------------------------------------------
# HAProxy configuration and runtime commands (pure)
# --------------------------------------------------------------------------------------------


def haproxy_config(spec: LbSpec, stats_socket: str) -> str:
    """The configuration of one load balancer: a frontend and an (initially empty) backend per
    forwarding rule; members come and go through the runtime API (``add_server_commands``)."""
    hc = spec.health_check
    lines = [
        "global",
        f"    stats socket {stats_socket} mode 600 level admin",
        "    maxconn 4096",
        "",
        "defaults",
        "    timeout connect 5s",
        f"    timeout client {spec.idle_timeout}s",
        f"    timeout server {spec.idle_timeout}s",
        f"    timeout check {hc.response_timeout_seconds}s",
    ]
    for i, rule in enumerate(spec.forwarding_rules):
        lines += [
            "",
            f"frontend fe{i}",
            f"    mode {rule.mode}",
            f"    bind :{rule.entry_port}",
            f"    default_backend be{i}",
        ]
        if rule.mode == "http":
            lines.append("    option forwardfor")
        lines += ["", f"backend be{i}", f"    mode {rule.mode}", "    balance roundrobin"]
        if hc.protocol in ("http", "https"):
            lines += [f"    option httpchk GET {hc.path or '/'}", "    http-check expect status 200"]
    return "\n".join([*lines, ""])


def server_options(spec: LbSpec, rule: ForwardingRule) -> str:
    """The ``add server`` keywords of a member in ``rule``'s backend."""
    hc = spec.health_check
    words = [
        "check", "port", str(hc.port), "inter", f"{hc.check_interval_seconds}s",
        "rise", str(hc.healthy_threshold), "fall", str(hc.unhealthy_threshold),
    ]
    if rule.target_protocol == "https" and not rule.tls_passthrough:
        words += ["ssl", "verify", "none"]
        if hc.protocol != "https":
            words.append("no-check-ssl")
    elif hc.protocol == "https":
        words += ["check-ssl", "verify", "none"]
    if spec.proxy_protocol:
        words += ["send-proxy", "no-check-send-proxy"]
    return " ".join(words)


def add_server_commands(spec: LbSpec, member: Member) -> list[str]:
    """Runtime commands that add ``member`` DOWN: weight 0 while it is briefly UP on leaving
    maintenance (HAProxy 2.6 starts a server UP), then forced DOWN, so that it gets no request
    before ``rise`` consecutive checks passed."""
    cmds: list[str] = []
    for i, rule in enumerate(spec.forwarding_rules):
        srv = f"be{i}/{member.server}"
        cmds += [
            f"add server {srv} {member.address}:{rule.target_port} "
            f"{server_options(spec, rule)} weight 0",
            f"enable health {srv}",
            f"enable server {srv}",
            f"set server {srv} health down",
            f"set weight {srv} 1",
        ]
    return cmds


def parse_show_stat(text: str) -> list[dict[str, str]]:
    """Rows of ``show stat`` (CSV with a ``# pxname,svname,...`` header)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or not lines[0].startswith("# "):
        return []
    names = lines[0][2:].split(",")
    return [dict(zip(names, ln.split(","), strict=False)) for ln in lines[1:]]


def backend_status(haproxy_status: str, draining: bool) -> str:
    """healthy, unhealthy or draining from HAProxy's status column ("UP", "DOWN 1/3"...)."""
    if draining or haproxy_status.startswith(("DRAIN", "NOLB")):
        return "draining"
    return "healthy" if haproxy_status.startswith("UP") else "unhealthy"


# --------------------------------------------------------------------------------------------
# No network (unit tests, a stand-alone emulator)
# --------------------------------------------------------------------------------------------


class NullNetwork:
    """Realizes nothing; remembers the last plan (members reported healthy)."""

    def __init__(self, subnet: str = "10.213.0") -> None:
        self.subnet = subnet
        self.plan = NetworkPlan()

    def lb_addresses(self, slot: int) -> tuple[str, str]:
        a, b, c = self.subnet.split(".")
        octet = LB_FIRST_OCTET + slot
        return f"{a}.{b}.{c}.{octet}", f"{a}.{b}.{int(c) + 100}.{octet}"

    def apply(self, plan: NetworkPlan) -> None:
        self.plan = plan

    def lb_backends(self, lb_id: str) -> list[dict[str, Any]]:
        for spec in self.plan.lbs:
            if spec.id == lb_id:
                return [{"droplet_id": m.droplet_id, "address": m.address, "status": "healthy"}
                        for m in spec.members]
        return []

    def close(self) -> None:
        self.plan = NetworkPlan()


# --------------------------------------------------------------------------------------------
# The real thing
# --------------------------------------------------------------------------------------------


def _run(argv: Sequence[str], stdin: str | None = None,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=30,
                       env=hosts._tool_env(), check=False)
    if check and r.returncode != 0:
        raise hosts.LabError(f"failed (rc {r.returncode}): {' '.join(argv)}: "
                             f"{(r.stderr or r.stdout).strip()}")
    return r


def runtime(sock: Path, command: str, timeout: float = SOCKET_TIMEOUT) -> str:
    """One HAProxy runtime API command over its stats socket; its answer."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(sock))
        s.sendall(command.encode() + b"\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def lb_netns(cfg: hosts.LabConfig, slot: int) -> str:
    return f"{cfg.prefix}lb{slot}"


def lb_veth(cfg: hosts.LabConfig, slot: int) -> str:
    return f"{cfg.prefix}lbv{slot}"


def lb_root(cfg: hosts.LabConfig) -> Path:
    return cfg.state_dir / "lb"


@dataclass
class _RunningLb:
    spec: LbSpec
    dir: Path
    generation: int
    proc: hosts.PidRecord
    servers: dict[str, Member] = field(default_factory=dict)
    draining: dict[str, float] = field(default_factory=dict)  # server -> give-up deadline
    retired: list[hosts.PidRecord] = field(default_factory=list)

    @property
    def sock(self) -> Path:
        return self.dir / f"admin-{self.generation}.sock"

    @property
    def settings(self) -> LbSpec:
        """The spec without its members: what a reload is for."""
        return LbSpec(**{**self.spec.__dict__, "members": ()})


class LabNetwork:
    """Firewalls and load balancers on the lab ``cfg`` (needs root)."""

    def __init__(self, cfg: hosts.LabConfig) -> None:
        self.cfg = cfg
        self._lock = threading.Lock()
        self._fw_applied: dict[str, tuple[int, str | None]] = {}  # machine -> (netns ino, text)
        self._lbs: dict[str, _RunningLb] = {}

    def lb_addresses(self, slot: int) -> tuple[str, str]:
        octet = LB_FIRST_OCTET + slot
        return f"{self.cfg.subnet}.{octet}", f"{self.cfg.private_subnet}.{octet}"

    def apply(self, plan: NetworkPlan) -> None:
        with self._lock:
            for machine, fw in plan.firewalls.items():
                self._apply_firewall(machine, fw)
            wanted = {spec.id: spec for spec in plan.lbs}
            for lb_id in [i for i in self._lbs if i not in wanted]:
                self._remove_lb(self._lbs.pop(lb_id))
            for spec in wanted.values():
                self._apply_lb(spec)

    def lb_backends(self, lb_id: str) -> list[dict[str, Any]]:
        with self._lock:
            lb = self._lbs.get(lb_id)
            if lb is None:
                return []
            try:
                rows = parse_show_stat(runtime(lb.sock, "show stat -1 4 -1"))
            except OSError:
                rows = []
            status = {r.get("svname"): r.get("status", "") for r in rows if r.get("pxname") == "be0"}
            return [
                {"droplet_id": m.droplet_id, "address": m.address,
                 "status": backend_status(status.get(name, "DOWN"), name in lb.draining)}
                for name, m in sorted(lb.servers.items())
            ]

    def close(self) -> None:
        with self._lock:
            for lb in self._lbs.values():
                self._remove_lb(lb)
            self._lbs.clear()
            for machine, (_, text) in list(self._fw_applied.items()):
                if text is not None:
                    self._apply_firewall(machine, None)
            self._fw_applied.clear()
        down(self.cfg)  # whatever a previous process left

    # -- firewalls --------------------------------------------------------------------------

    def _apply_firewall(self, machine: str, fw: HostFirewall | None) -> None:
        try:
            ino = Path(f"/run/netns/{machine}").stat().st_ino
        except OSError:
            self._fw_applied.pop(machine, None)  # no such host (stopped): nothing to filter
            return
        text = iptables_restore_text(fw, hook=False) if fw is not None else None
        if self._fw_applied.get(machine) == (ino, text):
            return
        if fw is None and self._fw_applied.get(machine, (ino, None)) == (ino, None):
            # never filtered in this netns: leave it untouched (even listing our chain would
            # have the root's iptables set up tables inside a host that is still booting)
            self._fw_applied[machine] = (ino, None)
            return
        ns = ["ip", "netns", "exec", machine]
        present = _run([*ns, "iptables", "-w", "-t", "mangle", "-S", CHAIN_IN],
                       check=False).returncode == 0
        if fw is not None:
            restore = iptables_restore_text(fw, hook=not present)
            _run([*ns, "iptables-restore", "-w", "--noflush"], stdin=restore)
        elif present:
            _run([*ns, "iptables-restore", "-w", "--noflush"], stdin=iptables_remove_text())
        self._fw_applied[machine] = (ino, text)

    # -- load balancers ---------------------------------------------------------------------

    def _apply_lb(self, spec: LbSpec) -> None:
        lb = self._lbs.get(spec.id)
        if lb is None:
            lb = self._start_lb(spec)
            self._lbs[spec.id] = lb
        elif LbSpec(**{**spec.__dict__, "members": ()}) != lb.settings:
            self._reload(lb, spec)
        lb.spec = spec
        self._sync_members(lb)

    def _start_lb(self, spec: LbSpec) -> _RunningLb:
        ns, veth = lb_netns(self.cfg, spec.slot), lb_veth(self.cfg, spec.slot)
        _run(["ip", "netns", "del", ns], check=False)
        _run(["ip", "link", "del", veth], check=False)
        _run(["ip", "netns", "add", ns])
        _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
        _run(["ip", "link", "set", veth, "master", self.cfg.bridge, "up"])
        for ip in (spec.public_ip, spec.private_ip):
            _run(["ip", "neigh", "flush", "to", ip, "dev", self.cfg.bridge], check=False)
            _run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0"])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        _run(["ip", "-n", ns, "route", "add", "default", "via", self.cfg.bridge_ip])
        d = lb_root(self.cfg) / f"lb{spec.slot}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        lb = _RunningLb(spec, d, 0, hosts.PidRecord(0, 0))
        lb.proc = self._spawn(lb, spec, previous=None)
        return lb

    def _spawn(self, lb: _RunningLb, spec: LbSpec, previous: hosts.PidRecord | None,
               ) -> hosts.PidRecord:
        lb.generation += 1
        cfg_path = lb.dir / f"haproxy-{lb.generation}.cfg"
        cfg_path.write_text(haproxy_config(spec, str(lb.sock)))
        _run(["haproxy", "-c", "-q", "-f", str(cfg_path)])
        argv = ["ip", "netns", "exec", lb_netns(self.cfg, spec.slot), "haproxy", "-db",
                "-f", str(cfg_path)]
        if previous is not None:
            argv += ["-sf", str(previous.pid)]  # the old one stops listening, finishes, exits
        rec = hosts._spawn_detached(argv, lb.dir / f"haproxy-{lb.generation}.pid",
                                    lb.dir / "haproxy.log")
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                runtime(lb.sock, "show info")
                return rec
            if time.monotonic() > deadline or not hosts._alive(rec):
                raise hosts.LabError(f"haproxy did not start; see {lb.dir / 'haproxy.log'}")
            time.sleep(0.05)

    def _reload(self, lb: _RunningLb, spec: LbSpec) -> None:
        """New settings: a new process takes over the listeners; members start DOWN again."""
        old = lb.proc
        lb.retired = [r for r in lb.retired if hosts._alive(r)] + [old]
        lb.servers.clear()
        lb.draining.clear()
        lb.proc = self._spawn(lb, spec, previous=old)

    def _sync_members(self, lb: _RunningLb) -> None:
        wanted = {m.server: m for m in lb.spec.members}
        for name, member in wanted.items():
            if name in lb.draining:
                self._commands(lb, [f"set server be{i}/{name} state ready"
                                    for i in range(len(lb.spec.forwarding_rules))])
                del lb.draining[name]
            elif name not in lb.servers:
                self._commands(lb, add_server_commands(lb.spec, member))
                lb.servers[name] = member
        for name in [n for n in lb.servers if n not in wanted and n not in lb.draining]:
            self._commands(lb, [f"set server be{i}/{name} state drain"
                                for i in range(len(lb.spec.forwarding_rules))])
            lb.draining[name] = time.monotonic() + lb.spec.idle_timeout
        for name, deadline in list(lb.draining.items()):
            if self._drained(lb, name) or time.monotonic() > deadline:
                if self._delete_server(lb, name):
                    del lb.draining[name]
                    del lb.servers[name]

    def _drained(self, lb: _RunningLb, name: str) -> bool:
        rows = parse_show_stat(runtime(lb.sock, "show stat -1 4 -1"))
        return all(int(r.get("scur") or 0) == 0 for r in rows if r.get("svname") == name)

    def _delete_server(self, lb: _RunningLb, name: str) -> bool:
        ok = True
        for i in range(len(lb.spec.forwarding_rules)):
            srv = f"be{i}/{name}"
            runtime(lb.sock, f"disable server {srv}")
            answer = runtime(lb.sock, f"del server {srv}")
            if "removed" not in answer.lower() and "no such server" not in answer.lower():
                ok = False  # idle connections still attached: again next reconcile
                runtime(lb.sock, f"shutdown sessions server {srv}")
        return ok

    def _commands(self, lb: _RunningLb, commands: Sequence[str]) -> None:
        for command in commands:
            answer = runtime(lb.sock, command).strip()
            if answer and any(w in answer.lower() for w in ("unknown", "error", "invalid",
                                                            "require", "cannot", "failed")):
                print(f"cloudnet: {lb.spec.id}: {command!r}: {answer}", file=sys.stderr)

    def _remove_lb(self, lb: _RunningLb) -> None:
        _stop_pids([lb.proc, *lb.retired])
        _run(["ip", "netns", "del", lb_netns(self.cfg, lb.spec.slot)], check=False)
        _run(["ip", "link", "del", lb_veth(self.cfg, lb.spec.slot)], check=False)
        shutil.rmtree(lb.dir, ignore_errors=True)


def _stop_pids(recs: Sequence[hosts.PidRecord]) -> None:
    for rec in recs:
        hosts._kill(rec, signal.SIGTERM)
    if not hosts._wait_gone(recs, 5):
        for rec in recs:
            hosts._kill(rec, signal.SIGKILL)
        hosts._wait_gone(recs, 5)


def down(cfg: hosts.LabConfig) -> None:
    """Remove every load balancer of lab ``cfg``: HAProxy by its recorded PIDs, then the
    netns, veths and state (by their names). Idempotent; used by ``gpufleet-lab down``."""
    root = lb_root(cfg)
    pidfiles = sorted(root.glob("lb*/haproxy-*.pid")) if root.is_dir() else []
    _stop_pids([r for p in pidfiles if (r := hosts._read_pidfile(p)) is not None])
    listing = _run(["ip", "netns", "list"], check=False).stdout
    for name in (line.split(" ")[0] for line in listing.splitlines()):
        if name.startswith(f"{cfg.prefix}lb") and name[len(cfg.prefix) + 2:].isdigit():
            _run(["ip", "netns", "del", name], check=False)
    for line in _run(["ip", "-o", "link", "show"], check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(f"{cfg.prefix}lbv") and name[len(cfg.prefix) + 3:].isdigit():
            _run(["ip", "link", "del", name], check=False)
    shutil.rmtree(root, ignore_errors=True)


def machine_has_chains(machine: str) -> bool:
    """Whether our firewall chains exist in ``machine``'s netns (tests)."""
    r = _run(["ip", "netns", "exec", machine, "iptables", "-w", "-t", "mangle", "-S"],
             check=False)
    return CHAIN_IN in r.stdout or CHAIN_OUT in r.stdout

