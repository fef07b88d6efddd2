"""The @deploy compositions: bare GPU droplet -> verified vLLM endpoint.

``deploys/llama3.py`` calls :func:`deploy_service_from_file`; the rollout driver and the tests
call :func:`vllm_service` with an already validated spec.
"""

from __future__ import annotations

import os
from importlib import resources
from io import StringIO
from pathlib import Path

from pyinfra import host, inventory
from pyinfra.api import deploy
from pyinfra.operations import docker as pyinfra_docker
from pyinfra.operations import files, systemd
from pyinfra.operations.util import any_changed

from gpufleet import render
from gpufleet import secrets as service_secrets
from gpufleet.facts.vllm import VERIFY_SCRIPT
from gpufleet.operations import docker, nvidia, vllm
from gpufleet.spec import MIN_COMPUTE_CAPABILITY, SPEC_KEYS, ServiceSpec, SpecError, load_spec

UNIT_DIR = "/etc/systemd/system"
SECRETS_IN_CONTAINER = "/run/gpufleet/service.env"
# the vllm/vllm-openai entrypoint is `vllm serve`; this wrapper exports the secrets first
ENTRYPOINT_SCRIPT = f'set -a && . {SECRETS_IN_CONTAINER} && set +a && exec vllm serve "$@"'

# pyinfra's own data keys, which may legitimately appear in --data next to spec keys
_PYINFRA_DATA_PREFIXES = ("ssh_", "winrm_", "docker_", "chroot_", "local_", "fake_", "_")


def spec_overrides(data_source: object) -> dict[str, object]:
    """The spec keys set in pyinfra host/group data or ``--data`` for the current host."""
    overrides = {}
    for key in SPEC_KEYS:
        value = data_source.get(key)  # type: ignore[attr-defined]
        if value is not None:
            overrides[key] = value
    return overrides


def _check_override_keys(keys: list[str]) -> None:
    """A misspelled ``--data`` key would be silently ignored by pyinfra: refuse close misses."""
    import difflib

    for key in keys:
        if key in SPEC_KEYS or key.startswith(_PYINFRA_DATA_PREFIXES):
            continue
        close = difflib.get_close_matches(key, SPEC_KEYS, n=1, cutoff=0.75)
        if close:
            raise SpecError(f"--data {key}: unknown spec key; did you mean {close[0]!r}?")


def gpu_requirements(spec: ServiceSpec) -> dict[str, object]:
    why = {
        "fp8": "fp8 (W8A8) needs an Ada or Hopper GPU (compute capability 8.9+); use awq or gptq "
               "on older GPUs",
        "bf16": "bfloat16 needs compute capability 8.0+; use fp16 on older GPUs",
    }.get(spec.quantization, "vLLM needs compute capability 7.0 or newer")
    return {
        "count": spec.gpu_count,
        "memory_mib": spec.min_gpu_memory_mib,
        "compute_capability": MIN_COMPUTE_CAPABILITY.get(spec.quantization, (7, 0)),
        "why_compute_capability": why,
    }


def render_unit(spec: ServiceSpec, gpu_count: int | None = None) -> str:
    return render.render(
        "vllm.service.j2",
        spec=spec,
        vllm_args=spec.vllm_args(gpu_count),
        container_env=list(spec.container_env),
        secrets_in_container=SECRETS_IN_CONTAINER,
        entrypoint_script=ENTRYPOINT_SCRIPT,
        start_timeout=max(spec.cold_start_timeout, 900),
    )


@deploy("vLLM service")
def vllm_service(spec: ServiceSpec, secrets: service_secrets.ServiceSecrets) -> None:
    """Take one GPU host from bare VM to a verified vLLM endpoint. Every step is idempotent."""
    nvidia.gpus_verified(
        name="Check the NVIDIA driver and GPUs", host_name=host.name, **gpu_requirements(spec),
    )
    # daemon.json first: a broken file stops the host before anything changes
    daemon = docker.daemon_json(
        name="daemon.json: nvidia runtime as default", cgroup_driver=spec.docker_cgroup_driver,
    )
    docker.engine(name="Docker engine installed and running", package=spec.docker_package)
    nvidia.container_toolkit(
        name=f"NVIDIA container toolkit {spec.toolkit_version}",
        version=spec.toolkit_version,
        repo_url=spec.toolkit_repo_url,
        key_url=spec.toolkit_key_url,
    )
    systemd.service(
        name="Restart docker for the new daemon.json", service="docker.service", running=True,
        restarted=True, _if=daemon.did_change,
    )
    docker.default_runtime(name="docker info: default runtime is nvidia", runtime="nvidia")

    files.directory(name=f"Model store {spec.models_dir}", path=spec.models_dir,
                    user="root", group="root", mode="755")
    files.directory(name=f"vLLM compile cache {spec.compile_cache_dir}",
                    path=spec.compile_cache_dir, user="root", group="root", mode="755")
    # seam for weight staging (pre-download at a pinned revision) before the service restarts

    pyinfra_docker.image(name=f"Image {spec.image}", image=spec.image, present=True)
    env_file = vllm.secret_file(
        name=f"Env file {spec.env_file} (0600, secrets)", path=spec.env_file,
        content=secrets.env_file_content(),
    )
    files.put(
        name="Endpoint verification script",
        src=str(resources.files("gpufleet.hostscripts").joinpath("verify_endpoint.py")),
        dest=VERIFY_SCRIPT, user="root", group="root", mode="755",
    )
    unit = files.put(
        name=f"systemd unit {spec.unit_name}",
        src=StringIO(render_unit(spec)),
        dest=f"{UNIT_DIR}/{spec.unit_name}", user="root", group="root", mode="644",
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
    vllm.endpoint_verified(
        name=f"Endpoint answers on :{spec.port} as {spec.name_served!r}",
        port=spec.port, served_name=spec.name_served, env_file=spec.env_file,
        container=spec.container_name, unit=spec.unit_name, timeout=spec.cold_start_timeout,
    )
    # seam: release record (issue 5)


def load_host_spec(spec_path: str | Path, environ: dict[str, str] | None = None) -> ServiceSpec:
    """The spec for the current host: the file, then environment settings, then host data."""
    environ = dict(os.environ) if environ is None else environ
    _check_override_keys(list(inventory.get_override_data()))
    return load_spec(spec_path, overrides=spec_overrides(host.data), environ=environ)


def load_secrets(spec: ServiceSpec, environ: dict[str, str] | None = None
                 ) -> service_secrets.ServiceSecrets:
    environ = dict(os.environ) if environ is None else environ
    token = service_secrets.hf_token(environ)
    if token is None and "HF_TOKEN" not in environ:
        raise service_secrets.SecretError(
            f"HF_TOKEN is not set. {spec.model} is downloaded from Hugging Face on the host: "
            "create a token with 'Read access to contents of all public gated repos' at "
            "https://huggingface.co/settings/tokens, accept the model's licence on its page, then "
            "`export HF_TOKEN=hf_...`. For a public model, `export HF_TOKEN=` deploys without one."
        )
    return service_secrets.ServiceSecrets(
        hf_token=token, api_key=service_secrets.api_key(spec.service, environ),
    )


def deploy_service_from_file(spec_path: str | Path) -> None:
    """What ``deploys/<service>.py`` calls: validate everything, then run the deploy."""
    spec = load_host_spec(spec_path)
    secrets = load_secrets(spec)
    vllm_service(spec=spec, secrets=secrets)
