"""Every DigitalOcean GPU size side by side for one spec: does it fit, and at what price?

Pure functions, no I/O. The plans come from ``plan_for_spec`` (one per size and quantization),
the offers (price and availability) from the catalogue (``gpufleet.model.gpus``) or from
``GET /v2/sizes``; ``gpufleet plan SPEC --gpu all`` gathers both and prints the rows with
``gpufleet.planner.render.render_sizes``.

Order: sizes that fit (``fits`` or ``fragile``) before refused ones; among them those the account
can buy (or not known not to) first, then the cheapest first, sizes without a known price after
the priced ones, then the slug.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gpufleet.model.gpus import DropletSize
from gpufleet.planner.plan import Plan, summary
from gpufleet.planner.verdict import FITS, FRAGILE, REFUSED

CATALOGUE, API = "catalogue", "api"
# what a size's availability is, in words: the API lists it with regions; with none; not at all
BUYABLE, NO_REGION, NOT_LISTED = "yes", "no region", "not listed"


@dataclass(frozen=True)
class Offer:
    """A size's price per hour and whether the account can buy it (None: not known)."""

    price_hourly: float | None
    price_source: str | None        # CATALOGUE, API, or None when no price is known
    availability: str | None        # BUYABLE, NO_REGION, NOT_LISTED; None: not asked

    @property
    def buyable(self) -> bool | None:
        return None if self.availability is None else self.availability == BUYABLE


def catalogue_offer(size: DropletSize) -> Offer:
    """The catalogue's list price; availability unknown."""
    price = size.price_hourly
    return Offer(price, CATALOGUE if price is not None else None, None)


def api_offer(size: DropletSize, price_hourly: float | None, buyable: bool | None) -> Offer:
    """What ``GET /v2/sizes`` says of a size: ``buyable`` None when it does not list it, then
    the catalogue's list price stands in."""
    if buyable is None:
        return Offer(catalogue_offer(size).price_hourly, catalogue_offer(size).price_source,
                     NOT_LISTED)
    return Offer(price_hourly, API if price_hourly is not None else None,
                 BUYABLE if buyable else NO_REGION)


def choose_plan(plans: Sequence[Plan]) -> Plan:
    """The first plan (in the order of the quantizations asked) that fits, else the first that
    is fragile, else the first."""
    if not plans:
        raise ValueError("no plan to choose from")
    return next((p for p in plans if p.verdict == FITS),
                next((p for p in plans if p.verdict == FRAGILE), plans[0]))


def reason(plan: Plan) -> str:
    """The verdict's one line: nothing for ``fits``, the first warning for ``fragile``, the main
    number for ``refused``."""
    if plan.verdict == REFUSED:
        return summary(plan)
    if plan.verdict == FRAGILE and plan.warnings:
        return plan.warnings[0]
    return ""


@dataclass(frozen=True)
class SizeRow:
    """One size: the plan chosen for it and its offer."""

    size: DropletSize
    plan: Plan
    offer: Offer

    @property
    def usable(self) -> bool:
        """It fits and the account is not known to be unable to buy it."""
        return self.plan.fits and self.offer.buyable is not False

    def sort_key(self) -> tuple[Any, ...]:
        price = self.offer.price_hourly
        return (not self.plan.fits, self.offer.buyable is False, price is None, price or 0.0,
                self.size.slug)

    def to_json(self) -> dict[str, Any]:
        p = self.plan
        return {
            "slug": self.size.slug,
            "gpu_count": p.gpu_count,
            "gpu_name": p.gpu_name,
            "memory_mib": p.memory_mib,
            "verdict": p.verdict,
            "fits": p.fits,
            "reason": reason(p),
            "quantization": p.quantization,
            "tensor_parallel_size": p.tensor_parallel_size,
            "kv_cache_tokens": p.kv_cache_tokens,
            "max_concurrency": round(p.max_concurrency, 2),
            "max_model_len": p.max_model_len,
            "price_hourly": self.offer.price_hourly,
            "price_source": self.offer.price_source,
            "available": self.offer.availability,
            "plan": p.to_json(),
        }


def size_rows(plans: Mapping[str, Sequence[Plan]], sizes: Iterable[DropletSize],
              offers: Mapping[str, Offer]) -> list[SizeRow]:
    """One row per size (slug -> its plans, one per quantization), in the module's order."""
    rows = [SizeRow(size, choose_plan(plans[size.slug]),
                    offers.get(size.slug) or catalogue_offer(size))
            for size in sizes]
    return sorted(rows, key=SizeRow.sort_key)


def any_usable(rows: Iterable[SizeRow]) -> bool:
    return any(row.usable for row in rows)
