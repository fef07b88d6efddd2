"""Make sure the docker engine runs and uses the NVIDIA runtime by default."""

from __future__ import annotations

from io import StringIO

from pyinfra import host, logger
from pyinfra.api import FileUploadCommand, QuoteString, StringCommand, operation
from pyinfra.facts.files import FileContents

from gpufleet.facts.docker_engine import DockerEngine
from gpufleet.model import daemon_json as daemonjson
from gpufleet.model.names import RESTART_SCRIPT
from gpufleet.operations.util import fail_host

DAEMON_JSON = "/etc/docker/daemon.json"
# daemon_json keeps the file it replaces under a fixed name (or records there was none), so a
# daemon.json docker refuses can be put back without knowing the backup's time stamp
PREVIOUS_SUFFIX = ".gpufleet-previous"
ABSENT_SUFFIX = ".gpufleet-previous.absent"


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
    The new file is validated with ``dockerd --validate`` when docker supports it (23 and
    later), the previous one is kept as ``daemon.json.gpufleet-backup-<time>`` and as
    ``daemon.json.gpufleet-previous`` (or ``daemon.json.gpufleet-previous.absent`` records that
    there was none) for ``restarted_for_daemon_json``, and the write is atomic (``mv``).
    A file that is not valid JSON fails the host and is left untouched; run this early, before
    anything else changes on the host. Docker is not restarted here: restart it with
    ``restarted_for_daemon_json`` when this operation changed something (and
    ``default_runtime`` restarts it if the running daemon still does not use the nvidia
    runtime).

    + path: daemon.json location
    + cgroup_driver: ``cgroupfs`` (default) sets ``exec-opts: native.cgroupdriver=cgroupfs`` so
      that ``systemctl daemon-reload`` cannot cut running GPU containers off their GPUs; None
      leaves the driver alone

    **Example:**

    .. code:: python

        daemon = docker.daemon_json(name="NVIDIA default runtime in daemon.json")
        docker.restarted_for_daemon_json(name="Restart docker", _if=daemon.did_change)
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
    previous, absent = path + PREVIOUS_SUFFIX, path + ABSENT_SUFFIX
    yield StringCommand(
        "chmod", "644", QuoteString(new), "&&",
        "if [ -e", QuoteString(path), "]; then", "cp", "-p", QuoteString(path),
        StringCommand(QuoteString(path + ".gpufleet-backup-"), "$(date +%Y%m%dT%H%M%S)",
                      _separator=""),
        "&&", "cp", "-p", QuoteString(path), QuoteString(previous), "&&",
        "rm", "-f", QuoteString(absent), ";",
        "else", "rm", "-f", QuoteString(previous), "&&", ":", ">", QuoteString(absent), ";",
        "fi", "&&", "mv", "-f", QuoteString(new), QuoteString(path),
    )


@operation(is_idempotent=False)
def restarted_for_daemon_json(path: str = DAEMON_JSON, wait: int = 20,
                              script: str = RESTART_SCRIPT):
    """
    Restart docker for a new daemon.json and make sure it comes back. When the restart fails or
    docker is not active within ``wait`` seconds (docker before 23 has no ``dockerd --validate``,
    and no version validates against the flags docker.service passes), the previous daemon.json
    that ``daemon_json`` kept is put back (or the new one removed when there was none), docker
    is restarted on it, the units that need docker are started again, and the host fails with
    the file, the line docker logged about it and what to do. Run it only when ``daemon_json``
    changed something; the host script ``docker_restart.py`` must be installed first.

    + path: daemon.json location (as given to ``daemon_json``)
    + wait: seconds docker may take to become active after each restart
    + script: where the ``docker_restart.py`` host script is installed

    **Example:**

    .. code:: python

        daemon = docker.daemon_json(name="NVIDIA default runtime in daemon.json")
        docker.restarted_for_daemon_json(name="Restart docker for the new daemon.json",
                                         _if=daemon.did_change)
    """
    yield StringCommand("python3", QuoteString(script), "--config", QuoteString(path),
                        "--wait", QuoteString(str(wait)))


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
