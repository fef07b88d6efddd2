"""What the hosts have recorded, read on many hosts at once: their service and its releases."""

from __future__ import annotations

from typing import Any

from pyinfra.api import State
from pyinfra.api.facts import get_fact
from pyinfra.api.host import Host

from gpufleet.facts.release_records import RecordedServices, ReleaseState
from gpufleet.fleet.report import RolloutError
from gpufleet.fleet.session import in_parallel


def discover_service(state: State, hosts: list[Host], service: str | None = None) -> str:
    """``service`` (``--service``), else the one service with releases recorded on the hosts."""
    if service:
        return service
    found = in_parallel(
        lambda h: get_fact(state, h, RecordedServices, apply_failed_hosts=False), hosts)
    services = {s for v in found.values() if isinstance(v, list) for s in v}
    if len(services) != 1:
        raise RolloutError("cannot tell which service: "
                           + (f"the hosts have {', '.join(sorted(services))}"
                              if services else "no releases recorded on the hosts")
                           + "; pass --service")
    return services.pop()


def read_states(state: State, hosts: list[Host], service: str) -> dict[str, dict[str, Any]]:
    """Host name -> its ``ReleaseState`` for ``service`` (current, previous, records, lock)."""
    found = in_parallel(
        lambda h: get_fact(state, h, ReleaseState, kwargs={"service": service},
                           apply_failed_hosts=False), hosts)
    out = {}
    for name, value in found.items():
        if not isinstance(value, dict):
            raise RolloutError(f"{name}: cannot read its releases: {value}")
        out[name] = value
    return out
