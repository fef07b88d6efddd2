"""The @deploy compositions: bare GPU droplet -> verified vLLM endpoint.

``deploys/llama3.py`` calls :func:`deploy_service_from_file`; the rollout driver and the tests
call :func:`vllm_service` with an already validated spec.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import uuid
import weakref
from importlib import resources
from io import StringIO
from pathlib import Path
from typing import Any

import pyinfra
from pyinfra import host, inventory, logger
from pyinfra.api import deploy
from pyinfra.context import ctx_host, ctx_state
from pyinfra.operations import docker as pyinfra_docker
from pyinfra.operations import files, systemd
from pyinfra.operations.util import any_changed

from gpufleet.clients import hub
from gpufleet.deploy import front as service_front
from gpufleet.deploy import unit_file as render
from gpufleet.deploy import weight_peers
from gpufleet.facts.nvidia import NvidiaGpus
from gpufleet.facts.weights import WeightsStaged
from gpufleet.fleet import lost_hosts
from gpufleet.fleet import run_lock as hostlock
from gpufleet.fleet.deploy_results import DeployResult, hand_back
from gpufleet.model import front, image_cuda, names
from gpufleet.model import secrets as service_secrets
from gpufleet.model.gpus import compute_floor
from gpufleet.model.model_shape import ModelShape
from gpufleet.model.release import LockHolder, deployed_by, now_iso
from gpufleet.model.spec import (
    SPEC_KEYS,
    ServiceSpec,
    check_data_keys,
    load_spec,
)
from gpufleet.model.vllm_args import serve_args
from gpufleet.operations import docker_engine as docker
from gpufleet.operations import hostfiles, nvidia, vllm
from gpufleet.operations import release_records as releases
from gpufleet.operations import weights as models
from gpufleet.planner import plan as planner

SECRETS_IN_CONTAINER = "/run/gpufleet/service.env"
# the vllm/vllm-openai entrypoint is `vllm serve`; this wrapper exports the secrets first
ENTRYPOINT_SCRIPT = f'set -a && . {SECRETS_IN_CONTAINER} && set +a && exec vllm serve "$@"'


def spec_overrides(data_source: object) -> dict[str, object]:
    """The spec keys set in pyinfra host/group data or ``--data`` for the current host."""
    overrides = {}
    for key in SPEC_KEYS:
        value = data_source.get(key)  # type: ignore[attr-defined]
        if value is not None:
            overrides[key] = value
    return overrides


def _check_override_keys(keys: list[str]) -> None:
    """A ``--data`` key that is neither a spec key nor pyinfra's or the inventory's own would be
    silently ignored by pyinfra: refuse it (spec.check_data_keys, as ``gpufleet check`` does)."""
    check_data_keys(keys)


def gpu_requirements(spec: ServiceSpec) -> dict[str, object]:
    """What ``nvidia.gpus_verified`` checks: GPU count, memory, and the compute capability the
    spec's quantization needs, with its reason (``gpufleet.model.gpus.COMPUTE_FLOORS``)."""
    floor = compute_floor(spec.quantization)
    return {
        "count": spec.gpu_count,
        "memory_mib": spec.min_gpu_memory_mib,
        "compute_capability": floor.capability,
        "why_compute_capability": floor.reason,
    }


def vllm_args(spec: ServiceSpec, commit: str | None = None,
              plan: planner.Plan | None = None) -> list[str]:
    """``vllm serve`` arguments: the spec's, with the revision pinned to the resolved commit and
    the sizing flags (tensor parallel, utilization, lengths, quantization) from the host's plan."""
    return serve_args(spec, gpu_count=spec.gpu_count, revision=commit,
                      sizing=plan.flags if plan is not None else None)


def render_unit(spec: ServiceSpec, commit: str | None = None,
                plan: planner.Plan | None = None) -> str:
    offline = [("HF_HUB_OFFLINE", "1")] if commit else []
    return render.render(
        "vllm.service.j2",
        spec=spec,
        vllm_args=vllm_args(spec, commit, plan),
        container_env=offline + list(spec.container_env),
        secrets_in_container=SECRETS_IN_CONTAINER,
        entrypoint_script=ENTRYPOINT_SCRIPT,
        start_timeout=max(spec.cold_start_timeout, 900),
    )


@deploy("vLLM service")
def vllm_service(spec: ServiceSpec, secrets: service_secrets.ServiceSecrets,
                 shape: ModelShape | None = None, plan: planner.Plan | None = None,
                 hub_endpoint: str | None = None) -> DeployResult:
    """Take one GPU host from bare VM to a verified vLLM endpoint. Every step is idempotent.

    With ``shape`` (the model as the Hub describes it, revision resolved) the weights are staged
    before the service (re)starts and vLLM runs offline at that commit; with ``plan`` (this
    host's GPUs x the spec) the sizing flags come from the plan and a refused plan fails the host.

    Returns the release it records and its health gate (the endpoint check), also handed back
    to a rollout driver that runs this deploy (``gpufleet.fleet.deploy_results``).
    """
    spec, driver_refusal = host_image(spec)
    _gpus_and_docker(spec, plan, driver_refusal)
    checks_pass = plan is not None and plan.fits and driver_refusal is None
    env_file = _storage_image_and_secrets(spec, secrets, shape, hub_endpoint, checks_pass)
    front_config = service_front.configured(spec, secrets)
    return _service_verified_and_recorded(spec, secrets, shape, plan, env_file, front_config)


def host_image(spec: ServiceSpec) -> tuple[ServiceSpec, str | None]:
    """The spec this host runs, and why its NVIDIA driver cannot run the image (or None).

    Read from the driver before the image is pulled. With ``image_cuda: match_driver`` the
    image becomes the tag of the same release this host's driver runs, so the unit and the
    release record pin that tag (``gpufleet.model.image_cuda``)."""
    verdict = image_cuda.driver_verdict(spec.image, image_cuda.fact_driver(gpu_fact()),
                                        spec.image_cuda)
    if verdict.note:
        logger.warning(f"{host.print_prefix}image: {verdict.note}")
    if verdict.image != spec.image:
        spec = dataclasses.replace(spec, image=verdict.image)
    return spec, verdict.problem


def _gpus_and_docker(spec: ServiceSpec, plan: planner.Plan | None,
                     driver_refusal: str | None = None) -> None:
    """The GPUs and the driver checked, then docker with the NVIDIA runtime as its default."""
    refusal = None
    if plan is not None and not plan.fits:
        refusal = "the plan refuses this host: " + " ".join(plan.reasons)
    nvidia.gpus_verified(
        name="Check the NVIDIA driver and GPUs", host_name=host.name, plan_refusal=refusal,
        driver_refusal=driver_refusal, **gpu_requirements(spec),
    )
    # daemon.json first: a broken file stops the host before anything changes
    daemon = docker.daemon_json(
        name="daemon.json: nvidia runtime as default", cgroup_driver=spec.docker_cgroup_driver,
    )
    # the host scripts before anything needs them (the docker restart below is one)
    scripts = resources.files("gpufleet.hostscripts")
    hostfiles.installed(
        name="gpufleet host scripts (verify endpoint, stage weights, docker restart)",
        files={names.VERIFY_SCRIPT: scripts.joinpath("verify_endpoint.py").read_bytes(),
               names.STAGE_SCRIPT: scripts.joinpath("stage_weights.py").read_bytes(),
               names.RESTART_SCRIPT: scripts.joinpath("docker_restart.py").read_bytes()},
    )
    docker.engine(name="Docker engine installed and running", package=spec.docker_package)
    nvidia.container_toolkit(
        name=f"NVIDIA container toolkit {spec.toolkit_version}",
        version=spec.toolkit_version,
        repo_url=spec.toolkit_repo_url,
        key_url=spec.toolkit_key_url,
    )
    docker.restarted_for_daemon_json(
        name="Restart docker for the new daemon.json", path=docker.DAEMON_JSON,
        _if=daemon.did_change,
    )
    docker.default_runtime(name="docker info: default runtime is nvidia", runtime="nvidia")


def _storage_image_and_secrets(spec: ServiceSpec, secrets: service_secrets.ServiceSecrets,
                               shape: ModelShape | None, hub_endpoint: str | None,
                               checks_pass: bool = False) -> Any:
    """The model store and compile cache, the image, the two secret files and the staged
    weights (from the Hub, or from a peer that has them: ``gpufleet.deploy.weight_peers``).
    Returns the server env file's operation (a change restarts the service)."""
    # created when missing, never re-permissioned (files.directory would chmod an existing one)
    hostfiles.directory_created(name=f"Model store {spec.models_dir}", path=spec.models_dir)
    hostfiles.directory_created(name=f"vLLM compile cache {spec.compile_cache_dir}",
                                path=spec.compile_cache_dir)

    pyinfra_docker.image(name=f"Image {spec.image}", image=spec.image, present=True)
    # the server gets only its API key; the Hub token is for the weight staging alone
    both = [spec.env_file, spec.hf_token_file]  # read with one fact command
    env_file = vllm.secret_file(
        name=f"Env file {spec.env_file} (0600, API key)", path=spec.env_file,
        content=secrets.server_env(), read_with=both,
    )
    token_file = secrets.hub_token_file()
    vllm.secret_file(
        name=(f"Hub token file {spec.hf_token_file} (0600)" if token_file is not None
              else f"No Hub token file {spec.hf_token_file} (no HF_TOKEN)"),
        path=spec.hf_token_file, content=token_file, present=token_file is not None,
        read_with=both,
    )
    if shape is not None:
        # before the unit changes: the running server keeps serving while bytes travel
        staged = host.get_fact(WeightsStaged, models_dir=spec.models_dir, model=shape.model,
                               commit=shape.commit)
        # the host itself, not pyinfra's proxy for "the current host": a peer outlives this
        peer = weight_peers.peer_for(ctx_state.get(), ctx_host.get(), shape.model, shape.commit,
                                     spec.models_dir, staged_here=bool(staged),
                                     can_serve=checks_pass)
        what = dict(model=shape.model, commit=shape.commit, files=list(shape.files),
                    endpoint=hub_endpoint or hub.hub_endpoint(), token_file=spec.hf_token_file,
                    models_dir=spec.models_dir, revision=spec.revision)
        label = f"Weights {shape.model}@{shape.commit[:12]}"
        if peer is None:
            models.weights_staged(name=f"{label} staged in {spec.models_dir}", **what)
        else:  # a later line: pyinfra runs it after the peer's own staging, on every host
            models.weights_staged(name=f"{label} from peer {peer.name} into {spec.models_dir}",
                                  peer=peer, **what)
    return env_file


def _service_verified_and_recorded(spec: ServiceSpec, secrets: service_secrets.ServiceSecrets,
                                   shape: ModelShape | None, plan: planner.Plan | None,
                                   env_file: Any, front_config: Any) -> DeployResult:
    """The unit, (re)started only when it or the env file changed, the front applied (after
    vLLM left the public port), the health gate through the front, then the release record."""
    commit = shape.commit if shape else None
    unit = files.put(
        name=f"systemd unit {spec.unit_name}",
        src=StringIO(render_unit(spec, commit, plan)),
        dest=names.unit_path(spec.service), user="root", group="root", mode="644",
    )
    systemd.daemon_reload(name="systemd daemon-reload", _if=unit.did_change)
    systemd.service(
        name=f"Restart {spec.unit_name} for the new release", service=spec.unit_name,
        running=True, restarted=True, _if=any_changed(unit, env_file),
    )
    systemd.service(
        name=f"{spec.unit_name} enabled and running", service=spec.unit_name,
        running=True, enabled=True,
    )
    service_front.applied(front_config)
    health_gate = vllm.endpoint_verified(
        name=f"Endpoint answers at {front.local_url(spec)} as {spec.name_served!r}",
        url=front.local_url(spec), served_name=spec.name_served, env_file=spec.env_file,
        container=spec.container_name, unit=spec.unit_name, timeout=spec.cold_start_timeout,
    )
    # only reached when the health gate passed: a release that never answered is never current
    release = releases.release_recorded(
        spec=spec, env=secrets.server_env(), unit=render_unit(spec, commit, plan),
        revision=commit, flags=vllm_args(spec, commit, plan),
    )
    return hand_back(DeployResult(health_gate=health_gate, release=release))


def load_host_spec(spec_path: str | Path, environ: dict[str, str] | None = None) -> ServiceSpec:
    """The spec for the current host: the file, then environment settings, then host data."""
    environ = dict(os.environ) if environ is None else environ
    _check_override_keys(list(inventory.get_override_data()))
    return load_spec(spec_path, overrides=spec_overrides(host.data), environ=environ)


def load_secrets(spec: ServiceSpec, environ: dict[str, str] | None = None
                 ) -> service_secrets.ServiceSecrets:
    """HF_TOKEN (optional: a public model needs none; the Hub check says when one is needed)
    and the service's API key."""
    environ = dict(os.environ) if environ is None else environ
    return service_secrets.ServiceSecrets(
        hf_token=service_secrets.hf_token(environ),
        api_key=service_secrets.api_key(spec.service, environ),
    )


_PREFLIGHT: dict[tuple[str, str, str, str], ModelShape] = {}


def preflight(spec: ServiceSpec, secrets: service_secrets.ServiceSecrets,
              endpoint: str | None = None) -> ModelShape:
    """On the controller, before any host changes: gated access with this token, the revision
    resolved to a commit, the model's shape. Once per run (memoized across hosts)."""
    endpoint = hub.hub_endpoint(endpoint)
    token = secrets.hf_token.reveal() if secrets.hf_token else ""
    key = (endpoint, spec.model, spec.revision,
           hashlib.sha256(token.encode()).hexdigest())
    if key not in _PREFLIGHT:
        hub.check_access(spec.model, spec.revision, token, endpoint)
        _PREFLIGHT[key] = hub.model_shape(spec.model, spec.revision, token, endpoint,
                                          cache_dir=hub_cache_dir())
    return _PREFLIGHT[key]


def hub_cache_dir() -> Path:
    return service_secrets.state_dir(os.environ) / "hub-cache"


_GPU_FACTS: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def gpu_fact() -> dict[str, Any]:
    """The host's ``NvidiaGpus``, read once per run (a pyinfra ``State``): the plan and the
    image's driver check both need it while the deploy is defined. (The GPU check operation
    reads it again when it runs.)"""
    state, current = ctx_state.get(), ctx_host.get()
    if state is None or current is None or host is not pyinfra.host:  # not in a run
        return host.get_fact(NvidiaGpus)
    per_host = _GPU_FACTS.setdefault(state, {})
    name = current.name
    if name not in per_host:
        per_host[name] = host.get_fact(NvidiaGpus)
    return per_host[name]


def host_plan(spec: ServiceSpec, shape: ModelShape) -> planner.Plan | None:
    """The plan for this host's real GPUs (None when the driver does not answer: the GPU check
    then fails the host with the driver's story)."""
    fact = gpu_fact()
    if not fact.get("gpus"):
        return None
    plan = planner.plan_for_spec(spec, shape, fact["gpus"])
    logger.info(f"{host.print_prefix}plan: {plan.verdict}, tp {plan.tensor_parallel_size}, "
                f"{planner.summary(plan)} ({plan.gpu_name}, {spec.quantization})")
    for line in (*plan.reasons, *plan.warnings):
        logger.warning(f"{host.print_prefix}plan: {line}")
    return plan


_RUN = LockHolder(id=uuid.uuid4().hex[:8], command="deploy", who=deployed_by(), pid=os.getpid(),
                  started=now_iso())


def hold_run_lock(spec: ServiceSpec) -> None:
    """Take the service's run lock on this host before any of its operations is defined, so
    two runs never interleave on a host (a rollout that holds the lock already goes on)."""
    if hostlock.is_deferred() or hostlock.held_here(host.name, spec.service) is not None:
        return
    holder = dataclasses.replace(_RUN, hosts=len(inventory))
    hostlock.acquire(ctx_state.get(), ctx_host.get(), spec.service, holder,
                     wait=hostlock.wait_seconds())


def deploy_service_from_file(spec_path: str | Path) -> None:
    """What ``deploys/<service>.py`` calls: validate the spec, check the Hub, plan this host's
    GPUs, then run the deploy. Bad input stops here, before any host changes."""
    spec = load_host_spec(spec_path)
    lost_hosts.register_current()  # a host lost mid-run is reported with a reason
    hold_run_lock(spec)
    secrets = load_secrets(spec)
    shape = preflight(spec, secrets)
    vllm_service(spec=spec, secrets=secrets, shape=shape, plan=host_plan(spec, shape),
                 hub_endpoint=hub.hub_endpoint())
