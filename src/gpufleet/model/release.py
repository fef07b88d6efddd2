"""Releases: what a deploy puts on a host, named by a short content hash (pure, no I/O).

A release id hashes the rendered systemd unit, the SHA-256 of the env file (never the secrets
themselves), the image, the model and its revision and the ``vllm serve`` flags. Two deploys
with the same id put the same thing on a host. On the host (see ``operations/releases.py``)::

    /var/lib/gpufleet/<service>/
        releases/<id>/unit            copy of the unit file of that release
        releases/<id>/release.json    the record (``make_record``), one line of JSON
        current -> releases/<id>      the release that passed the health gate last
        previous -> releases/<id>     the one before it (a rollback target; its image is kept)
        lock, lock.holder.json        the run lock (a flock held while a run lives) and its holder
        audit.log                     one JSON line per host per rollout/rollback
"""

from __future__ import annotations

import getpass
import hashlib
import json
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from gpufleet.model import front
from gpufleet.model.names import (  # noqa: F401 (the paths of releases on a host)
    audit_log,
    lock_holder_path,
    lock_path,
    release_dir,
    releases_dir,
    service_dir,
    unit_name,
    unit_path,
)
from gpufleet.model.spec import ServiceSpec

ID_LENGTH = 12
KEEP_RELEASES = 5  # release records kept per service (current and previous always among them)

_ID = re.compile(r"^[0-9a-f]{6,64}$")


def is_release_id(text: str) -> bool:
    return bool(_ID.match(text))


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def deployed_by() -> str:
    """``user@controller-host`` of whoever runs gpufleet."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def release_id(unit: str, env_sha256: str, image: str, model: str, revision: str,
               flags: Sequence[str]) -> str:
    """The content hash naming a release: same inputs, same id, on every controller."""
    doc = json.dumps({"unit": unit, "env_sha256": env_sha256, "image": image, "model": model,
                      "revision": revision, "flags": list(flags)},
                     sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(doc.encode()).hexdigest()[:ID_LENGTH]


@dataclass(frozen=True)
class Release:
    """A release as the controller computes it from a spec (no secrets in here)."""

    id: str
    service: str
    image: str
    model: str
    revision: str
    quantization: str
    flags: tuple[str, ...]
    env_sha256: str
    unit_name: str
    unit_sha256: str
    port: int
    served_name: str
    env_file: str
    container: str
    cold_start_timeout: int
    # the front's URL on the host when the release was made (``gpufleet.model.front.local_url``;
    # checks read the front's own file first: names.front_url_file)
    endpoint: str = ""

    def record(self, created: str | None = None, by: str | None = None) -> dict[str, Any]:
        """The ``release.json`` written on the host."""
        doc = asdict(self)
        doc["flags"] = list(self.flags)
        doc["created"] = created or now_iso()
        doc["deployed_by"] = by or deployed_by()
        return doc

    def describe(self) -> str:
        return f"{self.id} ({self.image}, {self.model}@{self.revision}, {self.quantization})"


def release_for(spec: ServiceSpec, unit: str, env_sha256: str, revision: str | None = None,
                flags: Sequence[str] | None = None) -> Release:
    """The release a deploy of ``spec`` makes with this rendered ``unit`` and env file.

    ``revision`` and ``flags``: what the unit pins (the resolved commit, the host's sized
    flags) when they differ from the spec's."""
    flags = tuple(flags) if flags is not None else tuple(spec.vllm_args())
    revision = revision or spec.revision
    return Release(
        id=release_id(unit, env_sha256, spec.image, spec.model, revision, flags),
        service=spec.service,
        image=spec.image,
        model=spec.model,
        revision=revision,
        quantization=spec.quantization,
        flags=flags,
        env_sha256=env_sha256,
        unit_name=spec.unit_name,
        unit_sha256=sha256_text(unit),
        port=spec.port,
        served_name=spec.name_served,
        env_file=spec.env_file,
        container=spec.container_name,
        cold_start_timeout=spec.cold_start_timeout,
        endpoint=front.local_url(spec),
    )


def endpoint_of(record: Mapping[str, Any]) -> str:
    """Where a recorded release answers on its host (a record from before the front: vLLM's
    own port on the host's loopback)."""
    return str(record.get("endpoint") or f"http://127.0.0.1:{int(record.get('port', 8000))}")


def dumps(doc: Mapping[str, Any]) -> str:
    """One line of JSON (records, lock holders and audit lines are read back line by line)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def parse_json_line(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class LockHolder:
    """Who holds a service's run lock on a host (``lock.holder.json``)."""

    id: str
    command: str
    who: str
    pid: int
    started: str
    release: str | None = None
    hosts: int = 0

    def to_json(self) -> str:
        return dumps(asdict(self))

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any] | None) -> LockHolder | None:
        if not doc:
            return None
        try:
            return cls(id=str(doc["id"]), command=str(doc.get("command", "rollout")),
                       who=str(doc.get("who", "?")), pid=int(doc.get("pid", 0)),
                       started=str(doc.get("started", "?")), release=doc.get("release"),
                       hosts=int(doc.get("hosts", 0)))
        except (KeyError, TypeError, ValueError):
            return None

    def describe(self) -> str:
        what = f" to release {self.release}" if self.release else ""
        return (f"{self.command} {self.id}{what} by {self.who} (pid {self.pid}), "
                f"started {self.started}")


@dataclass
class AuditEntry:
    """One line of ``audit.log``: what one rollout or rollback did to this host."""

    rollout: str
    command: str
    by: str
    started: str
    finished: str
    result: str
    host: str
    batch: str | None
    from_release: str | None
    to_release: str | None
    host_result: str
    seconds: float | None
    options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return dumps(asdict(self))
