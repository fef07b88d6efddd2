"""Make sure the docker engine runs and uses the NVIDIA runtime by default."""

from __future__ import annotations

from io import StringIO

from pyinfra import host, logger
from pyinfra.api import FileUploadCommand, QuoteString, StringCommand, operation
from pyinfra.facts.files import FileContents

from gpufleet import daemonjson
from gpufleet.facts.docker import DockerEngine
from gpufleet.operations.util import fail_host

DAEMON_JSON = "/etc/docker/daemon.json"


@operation()
def engine(package: str = "docker.io"):
    """
    Make sure the docker engine is installed, enabled and running. DigitalOcean's GPU images ship
    docker; when it is missing, the distribution's package is installed.

    + package: the Debian/Ubuntu package to install when docker is missing

    **Example:**

    .. code:: python

        docker.engine(name="Docker engine", package="docker.io")
    """
    fact = host.get_fact(DockerEngine)
    if not fact["installed"]:
        yield StringCommand(
            "DEBIAN_FRONTEND=noninteractive", "apt-get", "update", "-q", "&&",
            "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-q",
            "--no-install-recommends", "-o", "Dpkg::Options::=--force-confold",
            QuoteString(package),
        )
        yield "systemctl enable --now docker.service"
        return
    if not fact["active"]:
        yield "systemctl enable --now docker.service"
        return
    host.noop(f"docker {fact['version'] or ''} is running".replace("  ", " "))


@operation()
def daemon_json(path: str = DAEMON_JSON, cgroup_driver: str | None = "cgroupfs"):
    """
    Merge the NVIDIA runtime into docker's daemon.json and make it the default runtime, keeping
    every other key. Semantically equal content is left alone (no rewrite, so no docker restart).
    The new file is validated with ``dockerd --validate`` when docker supports it, the previous
    one is kept as ``daemon.json.gpufleet-backup-<time>``, and the write is atomic (``mv``).
    A file that is not valid JSON fails the host and is left untouched; run this early, before
    anything else changes on the host. Docker is not restarted here: restart it when this
    operation changed something (and ``default_runtime`` restarts it if the running daemon still
    does not use the nvidia runtime).

    + path: daemon.json location
    + cgroup_driver: ``cgroupfs`` (default) sets ``exec-opts: native.cgroupdriver=cgroupfs`` so
      that ``systemctl daemon-reload`` cannot cut running GPU containers off their GPUs; None
      leaves the driver alone

    **Example:**

    .. code:: python

        daemon = docker.daemon_json(name="NVIDIA default runtime in daemon.json")
        systemd.service(name="Restart docker", service="docker", restarted=True,
                        _if=daemon.did_change)
    """
    try:
        current = daemonjson.parse(_read(path), path)
    except daemonjson.DaemonJsonError as e:
        yield from fail_host(str(e))
        return
    merged = daemonjson.merge(current, cgroup_driver)
    if merged == current:
        host.noop(f"{path} already has the nvidia default runtime")
        return
    logger.info(f"{host.print_prefix}{path}: setting {', '.join(daemonjson.changed_keys(current, merged))}")
    new = f"{path}.gpufleet-new"
    yield StringCommand("mkdir", "-p", QuoteString(path.rsplit("/", 1)[0]))
    yield FileUploadCommand(StringIO(daemonjson.render(merged)), new)
    yield StringCommand(
        "if dockerd --help 2>/dev/null | grep -q -- --validate; then",
        "dockerd", "--validate", "--config-file", QuoteString(new), ">/dev/null", "||",
        "{", "rm", "-f", QuoteString(new), ";", "exit", "1", ";", "}", ";", "fi",
    )
    yield StringCommand(
        "chmod", "644", QuoteString(new), "&&",
        "if [ -e", QuoteString(path), "]; then", "cp", "-p", QuoteString(path),
        StringCommand(QuoteString(path + ".gpufleet-backup-"), "$(date +%Y%m%dT%H%M%S)",
                      _separator=""),
        ";", "fi", "&&", "mv", "-f", QuoteString(new), QuoteString(path),
    )


@operation()
def default_runtime(runtime: str = "nvidia"):
    """
    Make sure the running docker daemon uses ``runtime`` by default, as ``docker info`` reports
    it. When it does not (daemon.json was merged but docker was not restarted, e.g. after an
    interrupted run), restart docker once and check again; fail this host if it still does not.

    + runtime: the expected default runtime

    **Example:**

    .. code:: python

        docker.default_runtime(name="docker info: default runtime nvidia", runtime="nvidia")
    """
    fact = host.get_fact(DockerEngine)
    if fact["default_runtime"] == runtime:
        host.noop(f"docker's default runtime is {runtime}")
        return
    message = (
        f"docker's default runtime was {fact['default_runtime']!r} (runtimes: "
        f"{', '.join(fact['runtimes']) or 'none'}) and is still not {runtime!r} after a restart. Check "
        "/etc/docker/daemon.json and `journalctl -u docker`."
    )
    yield "systemctl restart docker.service"
    yield StringCommand(
        "test", "\"$(docker info --format '{{.DefaultRuntime}}')\"", "=", QuoteString(runtime),
        "||", "{", "echo", QuoteString(f"gpufleet: {message}"), ">&2", ";", "exit", "1", ";", "}",
    )


def _read(path: str) -> str | None:
    lines = host.get_fact(FileContents, path=path)
    return None if lines is None else "\n".join(lines)
