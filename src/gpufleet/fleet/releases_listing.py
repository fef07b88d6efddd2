"""``gpufleet releases``: per host, its current and previous release and any lock."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pyinfra.api import Inventory

from gpufleet.fleet import session as fleet_session
from gpufleet.fleet.batches import order_hosts
from gpufleet.fleet.recorded import discover_service, read_states


def list_releases(inventory_path: str, service: str | None = None,
                  data: Mapping[str, Any] | None = None, limit: Sequence[str] | None = None,
                  inventory: Inventory | None = None) -> tuple[str, list[dict[str, Any]]]:
    """The service and, per host: current, previous, when current was created, and any lock
    (``{"host": ..., "error": "unreachable"}`` for a host that does not answer)."""
    session = fleet_session.FleetSession(
        inventory or fleet_session.load_inventory(inventory_path, data))
    names = order_hosts(session.names())
    if limit:
        names = [n for n in names if n in limit]
    state = session.state(names)
    try:
        hosts = fleet_session.connect(state)
        found_service = discover_service(state, hosts, service) if hosts else (service or "?")
        found = read_states(state, hosts, found_service) if hosts else {}
        return found_service, [_row(n, found.get(n)) for n in names]
    finally:
        fleet_session.shutdown(state)


def _row(name: str, st: dict[str, Any] | None) -> dict[str, Any]:
    if st is None:
        return {"host": name, "error": "unreachable"}
    cur = st["releases"].get(st["current"] or "", {})
    return {
        "host": name, "current": st["current"], "previous": st["previous"],
        "created": cur.get("created"), "image": cur.get("image"),
        "quantization": cur.get("quantization"), "deployed_by": cur.get("deployed_by"),
        "drift": bool(st["current"]) and st["unit_sha256"] != cur.get("unit_sha256"),
        "lock": st["lock"] if st["locked"] else None,
        "kept": sorted(st["releases"]),
    }
