"""The order and the batches of a rollout (pure: no host is touched).

Hosts go in a deterministic order (sorted names, ``--order`` first), the canary batch first,
then batches of N hosts or P% of the fleet.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gpufleet.fleet.report import RolloutError

DEFAULT_BATCH = "25%"


def batch_size(text: str, fleet: int) -> int:
    """``"3"`` -> 3 hosts; ``"25%"`` -> 25% of the fleet, rounded up, at least one."""
    value = str(text).strip()
    try:
        if value.endswith("%"):
            percent = float(value[:-1])
            if not 0 < percent <= 100:
                raise ValueError
            return max(1, math.ceil(fleet * percent / 100 - 1e-9))
        count = int(value)
        if count < 1:
            raise ValueError
        return count
    except ValueError:
        raise RolloutError(f"--batch must be a number of hosts (>= 1) or a percentage of the "
                           f"fleet like 25%, got {text!r}") from None


def order_hosts(names: Iterable[str], order: Sequence[str] | None = None) -> list[str]:
    """Sorted host names; with ``order``, those hosts first in that order, then the rest."""
    ordered = sorted(set(names))
    first = list(order or [])
    unknown = [n for n in first if n not in ordered]
    if unknown:
        raise RolloutError(f"--order names hosts that are not in the inventory: "
                           f"{', '.join(unknown)}")
    if len(set(first)) != len(first):
        raise RolloutError("--order names a host twice")
    return first + [n for n in ordered if n not in first]


@dataclass(frozen=True)
class Batch:
    label: str
    hosts: tuple[str, ...]


def plan_batches(names: Sequence[str], canary: int = 1, batch: str = DEFAULT_BATCH,
                 fleet: int | None = None) -> list[Batch]:
    """Canary batch (the first ``canary`` hosts), then batches of ``batch`` hosts, in order.

    ``fleet``: the size a percentage refers to (default: ``len(names)``)."""
    if canary < 0:
        raise RolloutError(f"--canary must be 0 or more, got {canary}")
    rest = list(names)
    size = batch_size(batch, fleet if fleet is not None else len(rest))
    out: list[Batch] = []
    if canary and rest:
        out.append(Batch("canary", tuple(rest[:canary])))
        rest = rest[canary:]
    for i in range(0, len(rest), size):
        out.append(Batch(f"batch {len(out) + 1}", tuple(rest[i:i + size])))
    return out


def max_out_of_service(fleet: int, canary: int = 1, batch: str = DEFAULT_BATCH) -> int:
    """The most hosts a rollout takes out of service at once: one batch at a time."""
    return max((len(b.hosts) for b in plan_batches([str(i) for i in range(fleet)], canary,
                                                   batch)), default=0)
