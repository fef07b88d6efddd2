"""``gpufleet plan SPEC --gpu all``: prices and availability of the sizes, and the report.

Prices come from the catalogue (``gpufleet.model.gpus``, DigitalOcean's list prices) unless a
DigitalOcean token is set: then ``GET /v2/sizes`` gives each size's ``price_hourly`` and whether
the account can buy it (a size it cannot buy has no regions; a per-contract size is not listed
at all). An API that fails falls back to the catalogue, and the report says why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gpufleet.clients.digitalocean import (
    DEFAULT_API_URL,
    DigitalOceanClient,
    DigitalOceanError,
    Size,
)
from gpufleet.model import gpus as gpu_catalog
from gpufleet.planner.plan import Plan
from gpufleet.planner.render import price_text, render_sizes
from gpufleet.planner.sizes import (
    API,
    CATALOGUE,
    Offer,
    SizeRow,
    any_usable,
    api_offer,
    catalogue_offer,
    size_rows,
)
from gpufleet.planner.verdict import FITS

ALL = "all"
TOKEN_ENV = ("DIGITALOCEAN_TOKEN", "DIGITALOCEAN_ACCESS_TOKEN")
API_URL_ENV = "DIGITALOCEAN_API_URL"


def is_all(name: str | None) -> bool:
    return name is not None and name.strip().lower() == ALL


@dataclass(frozen=True)
class Offers:
    """Each catalogue size's offer, the API's GPU sizes the catalogue lacks, and the source."""

    by_slug: dict[str, Offer]
    prices_from: str                # CATALOGUE or API
    source: str                     # in words, for the report
    uncatalogued: tuple[Size, ...] = field(default=())


def catalogue_offers(why: str = "") -> Offers:
    source = gpu_catalog.PRICE_SOURCE + (f"; {why}" if why else "")
    return Offers({s.slug: catalogue_offer(s) for s in gpu_catalog.SIZES}, CATALOGUE, source)


def offers_from_sizes(listed: Sequence[Size], api_url: str) -> Offers:
    """Offers from a ``GET /v2/sizes`` listing: a catalogue size it does not list keeps the
    catalogue's list price and is marked not listed."""
    by_api = {s.slug: s for s in listed}
    offers = {}
    for size in gpu_catalog.SIZES:
        got = by_api.get(size.slug)
        offers[size.slug] = api_offer(size, got.price_hourly if got else None,
                                      got.buyable if got else None)
    known = {s.slug for s in gpu_catalog.SIZES}
    extra = tuple(sorted((s for s in listed if s.gpu_info and s.gpu_info.count > 0
                          and s.slug not in known), key=lambda s: s.slug))
    source = (f"price_hourly and regions from GET /v2/sizes at {api_url} (sizes it does not "
              f"list: {gpu_catalog.PRICE_SOURCE})")
    return Offers(offers, API, source, extra)


def gather_offers(environ: Mapping[str, str], *, offline: bool = False) -> Offers:
    """The API's offers when a token is set (and not ``offline``), else the catalogue's."""
    token = next((environ[n].strip() for n in TOKEN_ENV if environ.get(n, "").strip()), "")
    if offline or not token:
        return catalogue_offers("--offline: the API was not asked" if offline and token else
                                "" if offline else
                                f"set {TOKEN_ENV[0]} for the account's prices and availability")
    api_url = (environ.get(API_URL_ENV, "").strip() or DEFAULT_API_URL).rstrip("/")
    try:
        client = DigitalOceanClient(token, api_url, max_retries=2, connect_retries=1)
        return offers_from_sizes(client.list_sizes(), api_url)
    except DigitalOceanError as e:
        return catalogue_offers(f"GET /v2/sizes failed: {e}")


@dataclass(frozen=True)
class Report:
    rows: list[SizeRow]
    offers: Offers

    @property
    def ok(self) -> bool:
        return any_usable(self.rows)

    def to_json(self) -> dict[str, Any]:
        return {
            "prices_from": self.offers.prices_from,
            "price_source": self.offers.source,
            "sizes": [r.to_json() for r in self.rows],
            "uncatalogued": [_size_json(s) for s in self.offers.uncatalogued],
            "ok": self.ok,
        }

    def render(self) -> str:
        out = [f"prices: {self.offers.source}", "", render_sizes(self.rows), ""]
        if self.offers.uncatalogued:
            out.append("not planned, not in gpufleet's GPU catalogue: " + ", ".join(
                f"{s.slug} ({price_text(s.price_hourly)}/hour)" for s in self.offers.uncatalogued))
        out.extend(summary_lines(self.rows, self.offers.prices_from))
        return "\n".join(out)


def summary_lines(rows: Sequence[SizeRow], prices_from: str) -> list[str]:
    """The cheapest size that fits, and those that fit at a price nobody told us."""
    usable = [r for r in rows if r.usable]
    if not usable:
        return ["no size fits" + (" that this account can buy" if prices_from == API else "")]
    priced = [r for r in usable if r.offer.price_hourly is not None]
    unpriced = [r.size.slug for r in usable if r.offer.price_hourly is None]
    out = []
    if priced:
        out.append(f"cheapest that fits: {_offer_text(priced[0])}")
        clean = next((r for r in priced if r.plan.verdict == FITS), None)
        if priced[0].plan.verdict != FITS and clean is not None:
            out.append(f"cheapest that fits without warnings: {_offer_text(clean)}")
    if unpriced:
        out.append(f"{'also fit' if priced else 'fit'}, price unknown: {', '.join(unpriced)}")
    return out


def _offer_text(row: SizeRow) -> str:
    fragile = "" if row.plan.verdict == FITS else f", {row.plan.verdict}"
    return (f"{row.size.slug} ({price_text(row.offer.price_hourly)}/hour, "
            f"{row.plan.quantization}, tensor parallel {row.plan.tensor_parallel_size}{fragile})")


def _size_json(size: Size) -> dict[str, Any]:
    gpu = size.gpu_info
    return {"slug": size.slug, "price_hourly": size.price_hourly, "buyable": size.buyable,
            "gpu_count": gpu.count if gpu else 0, "gpu_model": gpu.model if gpu else None}


def compare(plans: Mapping[str, Sequence[Plan]], offers: Offers) -> Report:
    """The rows of every catalogue size (slug -> its plans, one per quantization)."""
    return Report(size_rows(plans, gpu_catalog.SIZES, offers.by_slug), offers)
