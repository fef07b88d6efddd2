"""``gpufleet status``: every host of a service at a glance, read in parallel, one SSH command
per host (``hostscripts/service_status.py``). A host that cannot be read is a row with its
reason, never an abort."""

from __future__ import annotations

import calendar
import functools
import json
import socket
import time
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

from pyinfra.api import HiddenValue, Inventory, QuoteString, StringCommand
from pyinfra.api.host import Host

from gpufleet.fleet import lb_gate
from gpufleet.fleet import session as fleet_session
from gpufleet.fleet.batches import order_hosts
from gpufleet.fleet.report import RolloutError
from gpufleet.model import names

SCRIPT = "service_status.py"


@functools.cache
def script() -> str:
    return resources.files("gpufleet.hostscripts").joinpath(SCRIPT).read_text("utf-8")


def status_command(service: str | None) -> StringCommand:
    """The host's status in one command (the host finds its service when none is given)."""
    body = QuoteString(HiddenValue(script(), f"<hostscripts/{SCRIPT}>"))
    given = [QuoteString(f"--service={service}")] if service else []
    return StringCommand("python3", "-I", "-S", "-c", body,
                         QuoteString(f"--root={names.STATE_ROOT}"), *given)


def fleet_status(inventory_path: str, service: str | None = None,
                 data: Mapping[str, Any] | None = None, limit: Sequence[str] | None = None,
                 inventory: Inventory | None = None) -> tuple[str, list[dict[str, Any]]]:
    """The service and one row per host (``{"host": ..., "error": ...}`` for a host that could
    not be read). Connections and reads run on all hosts at once."""
    session = fleet_session.FleetSession(
        inventory or fleet_session.load_inventory(inventory_path, data), connect_timeout=5)
    host_names = order_hosts(session.names())
    if limit:
        host_names = [n for n in host_names if n in limit]
    state = session.state(host_names)
    try:
        hosts = fleet_session.connect(state)
        answers = fleet_session.shell(state, hosts, lambda h: status_command(service),
                                      timeout=30)
    finally:
        fleet_session.shutdown(state)
    rows = [parse_answer(n, *answers[n]) if n in answers
            else {"host": n, "error": unreachable_reason(session.host(n))} for n in host_names]
    lb = lb_gate.membership({n: session.host(n).data.dict() for n in host_names})
    for row in rows:
        if row["host"] in lb:
            row["lb"] = lb[row["host"]]
    return service or fleet_service(rows), rows


def fleet_service(rows: Sequence[Mapping[str, Any]]) -> str:
    """The service the hosts have (``a, b`` when they differ; ``?`` when none has one)."""
    found = sorted({str(r["service"]) for r in rows if r.get("service")})
    if len(found) > 1:
        raise RolloutError(f"the hosts have several services ({', '.join(found)}): "
                           "pass --service")
    return found[0] if found else "?"


def unreachable_reason(host: Host) -> str:
    address = str(host.data.get("ssh_hostname") or host.name)
    port = int(host.data.get("ssh_port") or 22)
    try:
        with socket.create_connection((address, port), timeout=3):
            pass
    except TimeoutError:
        return f"unreachable: no answer on {address}:{port}"
    except OSError as e:
        return f"unreachable: {address}:{port}: {e.strerror or e}"
    return f"unreachable: SSH to {address}:{port} failed (key or host key?)"


def parse_answer(name: str, ok: bool, lines: list[str]) -> dict[str, Any]:
    for line in reversed(lines):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict) and "unit" in value:
            return {"host": name, **value}
    return {"host": name, "error": ("cannot read its status: "
                                    + (" ".join(lines)[-200:] or "no output"))}


# -- rendering -----------------------------------------------------------------------------------

COLUMNS = ("host", "gpus", "driver", "release", "unit", "health", "model", "run/wait", "kv",
           "uptime")


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def created_age(created: str | None, now: float | None = None) -> float | None:
    if not created:
        return None
    try:
        then = calendar.timegm(time.strptime(created, "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        return None
    return (now if now is not None else time.time()) - then


def gpu_cell(row: Mapping[str, Any]) -> str:
    gpus = row.get("gpus") or []
    if not gpus:
        return "none" if not row.get("gpu_error") else "error"
    used = sum(g.get("memory_used_mib") or 0 for g in gpus) / 1024
    total = sum(g.get("memory_total_mib") or 0 for g in gpus) / 1024
    return f"{len(gpus)}x {gpus[0]['name']} {used:.1f}/{total:.1f} GiB"


def table_row(row: Mapping[str, Any], now: float | None = None) -> list[str]:
    if "error" in row:
        return [row["host"], row["error"], *["-"] * (len(COLUMNS) - 2)]
    rel = row.get("release") or {}
    unit = row.get("unit") or {}
    metrics = row.get("metrics")
    health = row.get("health")
    model = (f"{rel.get('served_name') or rel.get('model')}@{str(rel.get('revision'))[:12]}"
             if rel else "-")
    return [
        row["host"], gpu_cell(row), row.get("driver") or "-",
        f"{rel['id']} ({age(created_age(rel.get('created'), now))})" if rel else "none",
        f"{unit.get('active', '?')}" + (f" ({age(unit.get('since_s'))})"
                                        if unit.get("since_s") is not None else ""),
        {200: "ok", None: "-", 0: "no answer"}.get(health, str(health)),
        model,
        (f"{metrics.get('running', 0):g}/{metrics.get('waiting', 0):g}" if metrics else "-"),
        (f"{100 * metrics['kv_cache_usage']:.0f}%" if metrics and "kv_cache_usage" in metrics
         else "-"),
        age(row.get("uptime_s")),
    ]


def render(service: str, rows: Sequence[Mapping[str, Any]], now: float | None = None) -> str:
    """The table; with a load balancer, its view of each host as a last column."""
    with_lb = any("lb" in r for r in rows)
    head = [*COLUMNS, "lb"] if with_lb else list(COLUMNS)
    table = [head, *[table_row(r, now) + ([r.get("lb", "-")] if with_lb else []) for r in rows]]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    lines = [f"service {service}: {len(rows)} hosts"]
    for r in table:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines) + "\n"
