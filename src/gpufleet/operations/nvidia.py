"""Check the NVIDIA driver and GPUs, and install the NVIDIA container toolkit."""

from __future__ import annotations

from collections.abc import Iterator

from pyinfra import host
from pyinfra.api import QuoteString, StringCommand, operation
from pyinfra.facts.files import File, FileContents

from gpufleet.facts.nvidia import NvidiaGpus
from gpufleet.facts.toolkit import AptVersionKnown, DebVersions, NvidiaAptSources
from gpufleet.model.gpu_check import GpuRequirements, check_gpus, describe_gpus
from gpufleet.model.gpus import VLLM_FLOOR
from gpufleet.operations.util import fail_host

TOOLKIT_PACKAGES = (
    "nvidia-container-toolkit",
    "nvidia-container-toolkit-base",
    "libnvidia-container-tools",
    "libnvidia-container1",
)
KEYRING = "/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg"
LIST_FILE = "/etc/apt/sources.list.d/nvidia-container-toolkit.list"
APT_ENV = "DEBIAN_FRONTEND=noninteractive"


@operation()
def gpus_verified(
    count: int = 1,
    memory_mib: int = 0,
    compute_capability: tuple[int, int] = VLLM_FLOOR.capability,
    why_compute_capability: str = VLLM_FLOOR.reason,
    host_name: str | None = None,
    plan_refusal: str | None = None,
    driver_refusal: str | None = None,
):
    """
    Check that the host has working NVIDIA GPUs that can run the service; fail this host alone,
    saying what was found and what is needed, if not.

    + count: number of GPUs needed
    + memory_mib: memory needed on each GPU (MiB)
    + compute_capability: lowest compute capability allowed, as ``(major, minor)``
    + why_compute_capability: the reason for that minimum, for the message
    + host_name: name used in messages (defaults to the inventory name)
    + plan_refusal: why the VRAM plan for these GPUs refuses the service (gpufleet.planner.plan), if it does
    + driver_refusal: why the driver cannot run the image (gpufleet.model.image_cuda), if it cannot

    **Example:**

    .. code:: python

        nvidia.gpus_verified(
            name="GPUs can run Llama 3 8B in fp8",
            count=1,
            memory_mib=16384,
            compute_capability=(8, 9),
            why_compute_capability="fp8 needs Ada or Hopper",
        )
    """
    fact = host.get_fact(NvidiaGpus)
    need = GpuRequirements(count, memory_mib, tuple(compute_capability), why_compute_capability)
    problem = check_gpus(fact, need, host_name or host.name)
    if problem is None and driver_refusal:
        problem = f"{host_name or host.name}: {driver_refusal}"
    if problem is None and plan_refusal:
        problem = f"{host_name or host.name}: {describe_gpus(fact['gpus'])}: {plan_refusal}"
    if problem:
        yield from fail_host(problem)
        return
    host.noop(f"GPUs ok: {describe_gpus(fact['gpus'])}, driver {fact['gpus'][0]['driver_version']}")


@operation()
def container_toolkit(
    version: str,
    repo_url: str,
    key_url: str,
    keyring: str = KEYRING,
    list_file: str = LIST_FILE,
    packages: tuple[str, ...] = TOOLKIT_PACKAGES,
):
    """
    Install the NVIDIA container toolkit from NVIDIA's signed apt repository: a dearmored keyring
    under ``/usr/share/keyrings``, a ``signed-by`` list file (no apt-key), stale conflicting NVIDIA
    lists removed, ``apt-get update`` only when the source changed or the pinned version is not
    known yet, and the four packages pinned to one version.

    + version: Debian version of all four packages, e.g. ``1.17.8-1``
    + repo_url: the repository (``$(ARCH)`` is expanded by apt)
    + key_url: the repository's ASCII-armored signing key
    + keyring: where the dearmored keyring goes
    + list_file: the apt list file to manage
    + packages: the packages to pin

    **Example:**

    .. code:: python

        nvidia.container_toolkit(
            name="NVIDIA container toolkit 1.17.8",
            version="1.17.8-1",
            repo_url="https://nvidia.github.io/libnvidia-container/stable/deb/$(ARCH)",
            key_url="https://nvidia.github.io/libnvidia-container/gpgkey",
        )
    """
    installed = host.get_fact(DebVersions, packages=list(packages))
    wanted = [p for p in packages if installed.get(p) != version]
    source_line = f"deb [signed-by={keyring}] {repo_url} /"

    source_changed = False
    if not host.get_fact(File, path=keyring):
        source_changed = True
        yield from _keyring_commands(key_url, keyring)

    stale = [p for p in host.get_fact(NvidiaAptSources, repo_url=repo_url) if p != list_file]
    if stale:
        source_changed = True
        yield StringCommand("rm", "-f", *(QuoteString(p) for p in stale))

    if host.get_fact(FileContents, path=list_file) != [source_line]:
        source_changed = True
        yield StringCommand(
            "printf", "'%s\\n'", QuoteString(source_line), ">", QuoteString(list_file),
            "&&", "chmod", "644", QuoteString(list_file),
        )

    if not wanted:
        if not source_changed:
            host.noop(f"NVIDIA container toolkit {version} is installed")
        return

    if source_changed or not host.get_fact(AptVersionKnown, package=wanted[0], version=version):
        yield StringCommand(
            APT_ENV, "apt-get", "update", "-q", "-o", "Dir::Etc::sourcelist=" + list_file,
            "-o", "Dir::Etc::sourceparts=-", "-o", "APT::Get::List-Cleanup=0",
        )
    yield StringCommand(
        APT_ENV, "apt-get", "install", "-y", "-q", "--no-install-recommends",
        "--allow-downgrades", "-o", "Dpkg::Options::=--force-confold",
        *(QuoteString(f"{p}={version}") for p in packages),
    )


def _keyring_commands(key_url: str, keyring: str) -> Iterator[StringCommand]:
    tmp = f"{keyring}.download"
    yield StringCommand(
        "curl", "-fsSL", "--retry", "3", QuoteString(key_url), "-o", QuoteString(tmp),
        "&&", "gpg", "--batch", "--yes", "--dearmor", "-o", QuoteString(keyring),
        QuoteString(tmp), "&&", "chmod", "644", QuoteString(keyring),
        "&&", "rm", "-f", QuoteString(tmp),
    )
