"""A thin DigitalOcean API client on the standard library (urllib), for the few calls we need.

Droplets by tag (with the GPU caveat handled), droplet sizes with their prices, droplet actions
(rebuild, power_cycle, reboot, snapshot, ...) and their polling, droplet snapshots, tags, cloud
firewalls and load balancers (their JSON as the API has it: ``gpufleet.model.cloud`` builds and
compares it). Rate limits (429) are waited out using
``Retry-After`` / ``ratelimit-reset``; server errors are retried a bounded number of times;
every other failure raises ``DigitalOceanError`` with the HTTP status and the API's
``message``. The token travels only in the ``Authorization: Bearer`` header, only to the
configured API origin, and never appears in an error message.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

DEFAULT_API_URL = "https://api.digitalocean.com"
MAX_PER_PAGE = 200  # the API's maximum page size
MAX_PAGES = 10_000  # a runaway-pagination guard (2 million droplets at 200 a page)
USER_AGENT = "gpufleet-digitalocean/0.1 (python urllib)"
IDEMPOTENT = ("GET", "PUT", "DELETE")

Json = dict[str, Any]


class DigitalOceanError(Exception):
    """An API call failed. ``status`` is the HTTP status (None when no response came back)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error_id: str | None = None,
        api_message: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_id = error_id
        self.api_message = api_message  # the API's own ``message`` field, if any


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuInfo:
    count: int
    model: str | None = None
    vram_amount: float | None = None
    vram_unit: str | None = None

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> GpuInfo:
        vram = data.get("vram") or {}
        return cls(
            count=int(data.get("count") or 0),
            model=data.get("model"),
            vram_amount=vram.get("amount"),
            vram_unit=vram.get("unit"),
        )


@dataclass(frozen=True)
class Droplet:
    id: int
    name: str
    region: str
    size: str
    status: str
    tags: tuple[str, ...]
    public_ipv4: str | None
    private_ipv4: str | None
    image_slug: str | None
    image_id: int | None
    gpu_info: GpuInfo | None = None

    @property
    def is_gpu(self) -> bool:
        return self.gpu_info is not None and self.gpu_info.count > 0

    def address(self, kind: str) -> str | None:
        """The droplet's ``public`` or ``private`` IPv4 address."""
        if kind == "public":
            return self.public_ipv4
        if kind == "private":
            return self.private_ipv4
        raise ValueError(f"address kind must be 'public' or 'private', not {kind!r}")

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> Droplet:
        """Parse the API's droplet object (``GET /v2/droplets``, ``/v2/droplets/{id}``)."""
        try:
            droplet_id = int(data["id"])
            name = str(data["name"])
        except (KeyError, TypeError, ValueError):
            raise DigitalOceanError(
                f"unexpected droplet object from the API (no id/name): {sorted(data)!r}"
            ) from None
        region = data.get("region")
        size = data.get("size")
        image = data.get("image")
        gpu = data.get("gpu_info") or (size.get("gpu_info") if isinstance(size, Mapping) else None)
        return cls(
            id=droplet_id,
            name=name,
            region=str((region.get("slug") if isinstance(region, Mapping) else region) or ""),
            size=str(
                data.get("size_slug")
                or (size.get("slug") if isinstance(size, Mapping) else size)
                or ""
            ),
            status=str(data.get("status") or ""),
            tags=tuple(str(t) for t in data.get("tags") or ()),
            public_ipv4=_first_v4(data, "public"),
            private_ipv4=_first_v4(data, "private"),
            image_slug=image.get("slug") if isinstance(image, Mapping) else None,
            image_id=_int_or_none(image.get("id")) if isinstance(image, Mapping) else None,
            gpu_info=GpuInfo.from_api(gpu) if isinstance(gpu, Mapping) else None,
        )


@dataclass(frozen=True)
class Action:
    id: int
    status: str  # in-progress | completed | errored
    type: str
    started_at: str | None
    completed_at: str | None
    resource_id: int | None
    resource_type: str | None
    region_slug: str | None

    @property
    def done(self) -> bool:
        return self.status in ("completed", "errored")

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> Action:
        try:
            action_id = int(data["id"])
        except (KeyError, TypeError, ValueError):
            raise DigitalOceanError("unexpected action object from the API (no id)") from None
        region = data.get("region")
        return cls(
            id=action_id,
            status=str(data.get("status") or ""),
            type=str(data.get("type") or ""),
            started_at=data.get("started_at"),
            completed_at=data.get("completed_at"),
            resource_id=_int_or_none(data.get("resource_id")),
            resource_type=data.get("resource_type"),
            region_slug=data.get("region_slug")
            or (region.get("slug") if isinstance(region, Mapping) else None),
        )


@dataclass(frozen=True)
class Snapshot:
    id: int
    name: str
    created_at: str | None
    regions: tuple[str, ...]
    min_disk_size: int | None
    size_gigabytes: float | None
    resource_id: int | None = None

    @classmethod
    def from_api(cls, data: Mapping[str, Any], resource_id: int | None = None) -> Snapshot:
        try:
            snapshot_id = int(data["id"])  # an int on /droplets/{id}/snapshots, a str elsewhere
        except (KeyError, TypeError, ValueError):
            raise DigitalOceanError("unexpected snapshot object from the API (no id)") from None
        return cls(
            id=snapshot_id,
            name=str(data.get("name") or ""),
            created_at=data.get("created_at"),
            regions=tuple(data.get("regions") or ()),
            min_disk_size=_int_or_none(data.get("min_disk_size")),
            size_gigabytes=data.get("size_gigabytes"),
            resource_id=_int_or_none(data.get("resource_id")) or resource_id,
        )


@dataclass(frozen=True)
class Size:
    """One entry of ``GET /v2/sizes``: a plan, its list price and where it can be bought."""

    slug: str
    price_hourly: float | None
    price_monthly: float | None
    regions: tuple[str, ...]
    available: bool
    gpu_info: GpuInfo | None = None

    @property
    def buyable(self) -> bool:
        """The account can create droplets of this size: the API lists no region otherwise."""
        return self.available and bool(self.regions)

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> Size:
        slug = data.get("slug")
        if not isinstance(slug, str) or not slug:
            raise DigitalOceanError("unexpected size object from the API (no slug)")
        gpu = data.get("gpu_info")
        return cls(
            slug=slug,
            price_hourly=_float_or_none(data.get("price_hourly")),
            price_monthly=_float_or_none(data.get("price_monthly")),
            regions=tuple(str(r) for r in data.get("regions") or ()),
            available=bool(data.get("available", True)),
            gpu_info=GpuInfo.from_api(gpu) if isinstance(gpu, Mapping) else None,
        )


def _float_or_none(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _first_v4(data: Mapping[str, Any], kind: str) -> str | None:
    networks = data.get("networks") or {}
    for entry in networks.get("v4") or ():
        if isinstance(entry, Mapping) and entry.get("type") == kind and entry.get("ip_address"):
            return str(entry["ip_address"])
    return None


def union_tagged(tagged: Iterable[Droplet], gpus: Iterable[Droplet], tag: str) -> list[Droplet]:
    """Droplets from a ``tag_name`` listing plus the ``type=gpus`` ones carrying ``tag``,
    de-duplicated by id, sorted by (name, id)."""
    by_id: dict[int, Droplet] = {d.id: d for d in tagged}
    for droplet in gpus:
        if tag in droplet.tags:
            by_id.setdefault(droplet.id, droplet)
    return sorted(by_id.values(), key=lambda d: (d.name, d.id))


# --------------------------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """urllib would follow a redirect and re-send the Authorization header to wherever it
    points; the API does not redirect these calls, so a redirect is an error instead."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[override]
        return None


def retry_after_seconds(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds to wait after a 429, from ``Retry-After`` (seconds or HTTP date) or from
    ``ratelimit-reset`` (Unix time when the oldest request expires); None if neither."""
    value = headers.get("Retry-After")
    if value:
        value = value.strip()
        if value.isdigit():
            return float(value)
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            when = None
        if when is not None:
            return max(0.0, when.timestamp() - now)
    reset = headers.get("ratelimit-reset")
    if reset and reset.strip().isdigit():
        return max(0.0, float(reset) - now)
    return None


class _Transport:
    """The HTTP side of ``DigitalOceanClient(token, base_url=...)``: see the module docstring.

    ``max_retries`` bounds the retries of one request after a 429 or a server error;
    ``connect_retries`` bounds the retries of a GET, PUT or DELETE that got no response at all. ``sleep``
    and ``clock`` are injectable for tests.
    """

    def __init__(
        self,
        token: str,
        base_url: str = DEFAULT_API_URL,
        *,
        timeout: float = 30.0,
        max_retries: int = 5,
        connect_retries: int = 2,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        token = (token or "").strip()
        if not token:
            raise DigitalOceanError("no DigitalOcean API token given")
        if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in token):
            # http.client would reject the header and quote its value in the exception.
            raise DigitalOceanError(
                "the DigitalOcean API token contains whitespace or control "
                "characters; check how it was set"
            )
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise DigitalOceanError(
                f"the DigitalOcean API URL must be http(s)://host[:port], not {base_url!r}"
            )
        self._token = token
        self.base_url = base_url.rstrip("/")
        self._origin = (parts.scheme, parts.netloc)
        self.timeout = timeout
        self.max_retries = max_retries
        self.connect_retries = connect_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._sleep = sleep
        self._clock = clock
        self._opener = urllib.request.build_opener(_NoRedirect)

    def __repr__(self) -> str:  # never show the token
        return f"DigitalOceanClient(base_url={self.base_url!r})"

    # -- HTTP -------------------------------------------------------------------------------

    def _get_object(self, path: str, key: str) -> Json:
        return _expect(self._request("GET", path), key)

    def _list(self, path: str, key: str, query: Mapping[str, Any]) -> list[Json]:
        """All items of a paginated listing, following ``links.pages.next``."""
        items: list[Json] = []
        target = self._url(path, {**query, "per_page": MAX_PER_PAGE})
        seen: set[str] = set()
        for _ in range(MAX_PAGES):
            seen.add(target)
            data = self._request("GET", target)
            page = data.get(key)
            if not isinstance(page, list):
                raise DigitalOceanError(
                    f"unexpected response from GET {_path_of(target)}: no {key!r} list"
                )
            items.extend(page)
            links = data.get("links") or {}
            next_url = (links.get("pages") or {}).get("next") if isinstance(links, dict) else None
            if not next_url or not page:
                return items
            target = self._rebase(str(next_url))
            if target in seen:
                raise DigitalOceanError(
                    f"the DigitalOcean API's pagination loops at {_path_of(target)}"
                )
        raise DigitalOceanError(f"GET {path}: more than {MAX_PAGES} pages; giving up")

    def _url(self, path: str, query: Mapping[str, Any] | None = None) -> str:
        url = self.base_url + path
        if query:
            url += "?" + urlencode(query)
        return url

    def _rebase(self, url: str) -> str:
        """A ``links.pages.next`` URL, pointed at our API origin.

        The real API answers with absolute https://api.digitalocean.com/... links; behind a
        proxy or against the lab emulator the base URL differs. Whatever origin the link
        names, the request (and the token) goes to the configured base URL only."""
        parts = urlsplit(url)
        if (parts.scheme, parts.netloc) == self._origin:
            return url
        path = parts.path
        if "/v2/" in path:
            path = path[path.index("/v2/") :]
        return self.base_url + path + (f"?{parts.query}" if parts.query else "")

    def _request(self, method: str, path_or_url: str, body: Json | None = None) -> Json:
        url = path_or_url if "://" in path_or_url else self._url(path_or_url)
        what = f"{method} {_path_of(url)}"
        data = json.dumps(body).encode() if body is not None else None
        headers = {
            "Authorization": f"Bearer {self._token}",
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
        }
        if data is not None:
            headers["Content-Type"] = "application/json"
        retries = 0
        unreachable = 0
        while True:
            request = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as err:
                status = err.code
                payload = _error_payload(err)
                delay = self._retry_delay(method, status, err.headers, retries)
                if delay is None:
                    raise self._http_error(what, status, payload, retries) from None
                retries += 1
                self._sleep(delay)
                continue
            except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
                # No (complete) response: connection refused, DNS, TLS, timeout, reset.
                # Only an idempotent call is safe to repeat; a POST might have been carried out.
                if method in IDEMPOTENT and unreachable < self.connect_retries:
                    unreachable += 1
                    self._sleep(min(self.backoff * 2 ** (unreachable - 1), self.max_backoff))
                    continue
                raise DigitalOceanError(
                    self._redact(
                        f"cannot reach the DigitalOcean API at {self.base_url}: {_reason(err)}"
                    )
                ) from None
            if not raw.strip():
                return {}
            try:
                parsed = json.loads(raw)
            except ValueError:
                raise DigitalOceanError(
                    f"unexpected response from {what}: not JSON ({raw[:80]!r})"
                ) from None
            if not isinstance(parsed, dict):
                raise DigitalOceanError(f"unexpected response from {what}: not a JSON object")
            return parsed

    def _retry_delay(self, method: str, status: int, headers: Any, retries: int) -> float | None:
        if retries >= self.max_retries:
            return None
        exponential = min(self.backoff * 2**retries, self.max_backoff)
        if status == 429:
            wait = retry_after_seconds(headers or {}, self._clock())
            # +1 s: ratelimit-reset has one-second resolution; arriving early just costs a 429.
            return min(wait + 1.0, self.max_backoff) if wait is not None else exponential
        if 500 <= status <= 599:
            # GET, PUT and DELETE are always safe to repeat. A POST (an action) only when a
            # gateway answered for an API that was not reached; a 500 may have acted already.
            if method in IDEMPOTENT or status in (502, 503, 504):
                return exponential
        return None

    def _http_error(self, what: str, status: int, payload: Json, retries: int) -> DigitalOceanError:
        error_id = payload.get("id") if isinstance(payload.get("id"), str) else None
        message = payload.get("message") if isinstance(payload.get("message"), str) else None
        detail = f"HTTP {status}"
        if error_id:
            detail += f" {error_id}"
        if message:
            detail += f": {message}"
        if status == 429:
            text = f"DigitalOcean API rate limit exceeded on {what} ({detail})"
        else:
            text = f"DigitalOcean API {what} failed: {detail}"
        if retries:
            text += f" (gave up after {retries} retries)"
        return DigitalOceanError(
            self._redact(text),
            status=status,
            error_id=error_id,
            api_message=self._redact(message) if message else None,
        )

    def _redact(self, text: str) -> str:
        return text.replace(self._token, "[REDACTED]")


class DigitalOceanClient(_Transport):
    """The API calls gpufleet makes: droplets, sizes, actions, snapshots, tags, firewalls and
    load balancers (``_Transport``: the token, retries, rate limits and pagination)."""

    # -- droplets ---------------------------------------------------------------------------

    def list_droplets(self, tag: str) -> list[Droplet]:
        """Every droplet carrying ``tag``, GPU droplets included, sorted by (name, id).

        The API documents that "By default, only non-GPU Droplets are returned. To list only
        GPU Droplets, set type=gpus ... Can not be combined with tag_name". Whether a
        ``tag_name`` filter is subject to that default is not stated (SkyPilot relies on it not
        being so). So we ask both ways: ``?tag_name=<tag>`` and ``?type=gpus`` filtered by tag
        on our side, and take the union by id. Costs one extra paginated listing; never misses
        a GPU droplet whichever way the API behaves.
        """
        tagged = self._list("/v2/droplets", "droplets", {"tag_name": tag})
        gpus = self._list("/v2/droplets", "droplets", {"type": "gpus"})
        return union_tagged(
            (Droplet.from_api(d) for d in tagged), (Droplet.from_api(d) for d in gpus), tag
        )

    def get_droplet(self, droplet_id: int) -> Droplet:
        return Droplet.from_api(self._get_object(f"/v2/droplets/{int(droplet_id)}", "droplet"))

    # -- sizes ------------------------------------------------------------------------------

    def list_sizes(self) -> list[Size]:
        """Every size of ``GET /v2/sizes`` (GPU sizes included: the listing has no type filter)."""
        return [Size.from_api(s) for s in self._list("/v2/sizes", "sizes", {})]

    # -- actions ----------------------------------------------------------------------------

    def droplet_action(self, droplet_id: int, type: str, **params: Any) -> Action:  # noqa: A002
        """``POST /v2/droplets/{id}/actions`` with ``{"type": type, **params}``, e.g.
        ``droplet_action(1, "rebuild", image="gpu-h100x1-base")``,
        ``droplet_action(1, "snapshot", name="before-upgrade")``, ``"power_cycle"``."""
        body = {"type": type, **params}
        data = self._request("POST", f"/v2/droplets/{int(droplet_id)}/actions", body=body)
        return Action.from_api(_expect(data, "action"))

    def rebuild(self, droplet_id: int, image: str | int) -> Action:
        return self.droplet_action(droplet_id, "rebuild", image=image)

    def power_cycle(self, droplet_id: int) -> Action:
        return self.droplet_action(droplet_id, "power_cycle")

    def reboot(self, droplet_id: int) -> Action:
        return self.droplet_action(droplet_id, "reboot")

    def snapshot(self, droplet_id: int, name: str) -> Action:
        return self.droplet_action(droplet_id, "snapshot", name=name)

    def get_action(self, action_id: int) -> Action:
        return Action.from_api(self._get_object(f"/v2/actions/{int(action_id)}", "action"))

    def wait_action(self, action_id: int, timeout: float, interval: float = 5.0) -> Action:
        """Poll until the action is ``completed``; raise if it is ``errored`` or still running
        after ``timeout`` seconds."""
        deadline = self._clock() + timeout
        while True:
            action = self.get_action(action_id)
            if action.status == "completed":
                return action
            if action.status == "errored":
                raise DigitalOceanError(
                    f"DigitalOcean action {action.id} ({action.type}) on droplet "
                    f"{action.resource_id} errored"
                )
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise DigitalOceanError(
                    f"DigitalOcean action {action.id} ({action.type}) on droplet "
                    f"{action.resource_id} did not complete within {timeout:g} s "
                    f"(last status: {action.status})"
                )
            self._sleep(min(interval, remaining))

    # -- snapshots --------------------------------------------------------------------------

    def list_snapshots(self, droplet_id: int) -> list[Snapshot]:
        items = self._list(f"/v2/droplets/{int(droplet_id)}/snapshots", "snapshots", {})
        return [Snapshot.from_api(s, resource_id=int(droplet_id)) for s in items]

    def list_droplet_snapshots(self) -> list[Snapshot]:
        """Every droplet snapshot of the account (``GET /v2/snapshots?resource_type=droplet``)."""
        items = self._list("/v2/snapshots", "snapshots", {"resource_type": "droplet"})
        return [Snapshot.from_api(s) for s in items]

    # -- tags -------------------------------------------------------------------------------

    def create_tag(self, name: str) -> None:
        """``POST /v2/tags``: idempotent (the API answers 201 for an existing name too)."""
        self._request("POST", "/v2/tags", body={"name": name})

    def tag_droplets(self, tag: str, droplet_ids: Iterable[int]) -> None:
        self._tag_resources("POST", tag, droplet_ids)

    def untag_droplets(self, tag: str, droplet_ids: Iterable[int]) -> None:
        self._tag_resources("DELETE", tag, droplet_ids)

    def _tag_resources(self, method: str, tag: str, droplet_ids: Iterable[int]) -> None:
        resources = [{"resource_id": str(int(i)), "resource_type": "droplet"} for i in droplet_ids]
        if resources:
            self._request(method, f"/v2/tags/{quote(tag, safe='')}/resources",
                          body={"resources": resources})

    # -- firewalls and load balancers ---------------------------------------------------------

    def list_firewalls(self) -> list[Json]:
        return self._list("/v2/firewalls", "firewalls", {})

    def create_firewall(self, body: Json) -> Json:
        return _expect(self._request("POST", "/v2/firewalls", body=body), "firewall")

    def update_firewall(self, firewall_id: str, body: Json) -> Json:
        """``PUT /v2/firewalls/{id}``: a full replacement of the firewall's rules and targets."""
        path = f"/v2/firewalls/{quote(firewall_id, safe='')}"
        return _expect(self._request("PUT", path, body=body), "firewall")

    def delete_firewall(self, firewall_id: str) -> None:
        self._request("DELETE", f"/v2/firewalls/{quote(firewall_id, safe='')}")

    def list_load_balancers(self) -> list[Json]:
        return self._list("/v2/load_balancers", "load_balancers", {})

    def get_load_balancer(self, lb_id: str) -> Json:
        return self._get_object(f"/v2/load_balancers/{quote(lb_id, safe='')}", "load_balancer")

    def create_load_balancer(self, body: Json) -> Json:
        return _expect(self._request("POST", "/v2/load_balancers", body=body), "load_balancer")

    def update_load_balancer(self, lb_id: str, body: Json) -> Json:
        """``PUT /v2/load_balancers/{id}``: a full replacement, like the firewall's."""
        path = f"/v2/load_balancers/{quote(lb_id, safe='')}"
        return _expect(self._request("PUT", path, body=body), "load_balancer")

    def delete_load_balancer(self, lb_id: str) -> None:
        self._request("DELETE", f"/v2/load_balancers/{quote(lb_id, safe='')}")


def _expect(data: Json, key: str) -> Json:
    value = data.get(key)
    if not isinstance(value, dict):
        raise DigitalOceanError(f"unexpected response from the DigitalOcean API: no {key!r}")
    return value


def _error_payload(err: urllib.error.HTTPError) -> Json:
    try:
        raw = err.read()
    except (OSError, http.client.HTTPException):
        return {}
    finally:
        err.close()
    try:
        parsed = json.loads(raw)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _reason(err: BaseException) -> str:
    reason: Any = getattr(err, "reason", None) or err
    if isinstance(reason, TimeoutError):
        return "timed out"
    return str(reason) or type(reason).__name__


def _path_of(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")
