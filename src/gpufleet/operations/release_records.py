"""Record releases on the host, switch between them, and the rollout lock and audit log.

A release becomes ``current`` only through :func:`recorded`, which the deploy runs after the
health gate passed; the one it replaces becomes ``previous``. Records are written with one
command, and a re-run of the same release reads one fact and changes nothing. Each command runs
``hostscripts/release_records.py``, sent with it (see ``gpufleet.facts.release_records``).
"""

from __future__ import annotations

from collections.abc import Sequence

from pyinfra import host
from pyinfra.api import StringCommand, operation

from gpufleet.facts.release_records import ReleaseState, script_command
from gpufleet.model import release as releases
from gpufleet.model.secrets import Secret
from gpufleet.model.spec import ServiceSpec
from gpufleet.operations.util import fail_host

UNIT_OWNER = "root:root"


def _activate_command(service: str, release_id: str) -> StringCommand:
    """Point ``current`` at the release, the old ``current`` becomes ``previous`` (atomic
    symlink swaps); then prune records beyond KEEP_RELEASES, never current/previous."""
    return script_command("activate", dir=releases.service_dir(service), id=release_id,
                          keep=releases.KEEP_RELEASES)


def release_recorded(spec: ServiceSpec, unit: str, env: Secret, revision: str | None = None,
                     flags: Sequence[str] | None = None,
                     name: str | None = None) -> releases.Release:
    """What the deploy calls after its health gate: compute the release of this deploy (on the
    controller, when the deploy is defined), add the :func:`recorded` operation, and return the
    release (the deploy hands it back to a rollout driver).

    + spec: the service spec the deploy used
    + unit: the rendered systemd unit the deploy wrote
    + env: the env file content (a ``Secret``): only its SHA-256 is kept
    + revision: the model revision the unit pins (the resolved commit; default: the spec's)
    + flags: the ``vllm serve`` arguments in the unit (default: the spec's)
    """
    release = releases.release_for(spec, unit, releases.sha256_text(env.reveal()),
                                   revision=revision, flags=flags)
    recorded(
        name=name or f"Release {release.id} recorded in {releases.service_dir(spec.service)}",
        service=spec.service, release_id=release.id, record=release.record(), unit=unit,
    )
    return release


@operation()
def recorded(service: str, release_id: str, record: dict, unit: str):
    """
    Record a release on the host and make it ``current`` (the old one becomes ``previous``).
    Run it after the health gate, so a release that never became healthy is never ``current``.
    A no-op, reading one fact, when the release is current already.

    + service: the service name
    + release_id: the release's id (``gpufleet.model.release.release_id``)
    + record: its ``release.json`` (``Release.record()``: no secrets, the env file's SHA-256)
    + unit: the rendered systemd unit, kept as ``releases/<id>/unit`` for a rollback

    **Example:**

    .. code:: python

        release = releases.release_for(spec, unit, env_sha256)
        releases.recorded(
            name="Release recorded", service=spec.service, release_id=release.id,
            record=release.record(), unit=unit,
        )
    """
    state = host.get_fact(ReleaseState, service=service)
    if state["current"] == release_id:
        host.noop(f"release {release_id} is current")
        return
    # the record must describe what runs: the script refuses when the unit in place is not the
    # one this run rendered (the run lock keeps other runs out; this catches a unit changed
    # behind gpufleet's back)
    yield script_command(
        "record", dir=releases.service_dir(service), unit=releases.unit_path(service),
        id=release_id, keep=releases.KEEP_RELEASES, record=releases.dumps(record),
        unit_text=unit, unit_sha256=record["unit_sha256"],
    )


@operation()
def activated(service: str, release_id: str):
    """
    Make a release that is recorded on the host ``current``; the one it replaces becomes
    ``previous``. A no-op when it is current already.

    + service: the service name
    + release_id: a release recorded under ``/var/lib/gpufleet/<service>/releases/``
    """
    state = host.get_fact(ReleaseState, service=service)
    if state["current"] == release_id:
        host.noop(f"release {release_id} is current")
        return
    if release_id not in state["releases"]:
        yield from fail_host(f"{host.name}: release {release_id} is not recorded here")
        return
    yield _activate_command(service, release_id)


@operation()
def unit_restored(service: str, release_id: str):
    """
    Put the unit file of a recorded release back in place (a rollback: the env file and its
    current secrets stay as they are). A no-op when the unit in place is that release's.

    + service: the service name
    + release_id: a release recorded on the host
    """
    state = host.get_fact(ReleaseState, service=service)
    record = state["releases"].get(release_id)
    if record is None:
        kept = ", ".join(sorted(state["releases"])) or "none"
        yield from fail_host(f"{host.name}: release {release_id} is not recorded here "
                             f"(kept: {kept})")
        return
    if state["unit_sha256"] and state["unit_sha256"] == record.get("unit_sha256"):
        host.noop(f"the unit in place is release {release_id}'s")
        return
    yield script_command("restore-unit", dir=releases.service_dir(service),
                         unit=releases.unit_path(service), id=release_id, owner=UNIT_OWNER)


# -- a command the rollout driver runs directly (not an operation: it must run even when the
# -- deploy of a batch failed) ------------------------------------------------------------------


def audit_command(service: str, audit_line: str) -> StringCommand:
    """Append one line to the service's audit log (for a host whose lock lease was lost)."""
    return script_command("audit", dir=releases.service_dir(service), line=audit_line)
