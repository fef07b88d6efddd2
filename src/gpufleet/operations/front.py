"""The service's front: nginx from the distribution, its config checked before a reload."""

from __future__ import annotations

import hashlib
from io import StringIO

from pyinfra import host
from pyinfra.api import FileUploadCommand, QuoteString, StringCommand, operation
from pyinfra.facts.files import Sha256File
from pyinfra.facts.server import Which


@operation()
def nginx_installed(package: str = "nginx"):
    """
    Install nginx from the distribution when it is missing (an installed one is left as it is,
    so a second run runs no ``apt-get update``).

    + package: the Debian/Ubuntu package

    **Example:**

    .. code:: python

        front.nginx_installed(name="nginx (the front)")
    """
    if host.get_fact(Which, command="nginx"):
        host.noop("nginx is installed")
        return
    yield StringCommand(
        "DEBIAN_FRONTEND=noninteractive", "apt-get", "update", "-q", "&&",
        "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-q",
        "--no-install-recommends", "-o", "Dpkg::Options::=--force-confold", QuoteString(package),
    )


@operation(is_idempotent=False)
def config_checked():
    """
    ``nginx -t``: the whole configuration parses, its files and certificates load. Run it after
    changing the config and before reloading: a failure fails the host with nginx's own error,
    and the running nginx keeps its old config.

    **Example:**

    .. code:: python

        front.config_checked(name="nginx -t", _if=site.did_change)
    """
    yield StringCommand("nginx", "-t", "-q")


@operation()
def site(path: str, content: str):
    """
    Put the front's nginx site in place only if nginx takes it: the new file replaces the old
    one, ``nginx -t`` checks the whole configuration, and a refused file is taken out again (the
    previous one put back), so the host fails with nginx's own error and its nginx config stays
    loadable, for a reload or a reboot. The running nginx is not reloaded here.

    + path: the site file (``/etc/nginx/conf.d/<name>.conf``)
    + content: its text (no secret: it is shown by ``--diff`` tools and kept world-readable)

    **Example:**

    .. code:: python

        front.site(name="Front of llama3", path="/etc/nginx/conf.d/gpufleet-llama3.conf",
                   content=site_text)
    """
    current = host.get_fact(Sha256File, path=path)
    if current == hashlib.sha256(content.encode()).hexdigest():
        host.noop(f"{path} is up to date")
        return
    new, previous = f"{path}.gpufleet-new", f"{path}.gpufleet-previous"
    yield FileUploadCommand(StringIO(content), new)
    keep = (StringCommand("cp", "-p", QuoteString(path), QuoteString(previous), "&&")
            if current else StringCommand("rm", "-f", QuoteString(previous), "&&"))
    put_back = (f"mv -f {previous} {path}" if current else f"rm -f {path}")
    yield StringCommand(
        "chmod", "644", QuoteString(new), "&&", keep, "mv", "-f", QuoteString(new),
        QuoteString(path), "&&", "{", "nginx", "-t", "-q", "||", "{", put_back, ";",
        "echo", QuoteString(f"gpufleet: nginx refused the new front {path} (its error above); "
                            "the previous config is back and nginx runs on"), ">&2", ";",
        "exit", "1", ";", "}", ";", "}")
