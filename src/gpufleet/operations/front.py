"""The service's front: nginx from the distribution and gpufleet's files for it, changed as one
whole that nginx must accept (``nginx -t``) or that is put back as it was."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from io import StringIO

from pyinfra import host
from pyinfra.api import FileUploadCommand, QuoteString, StringCommand, operation

from gpufleet.facts.front import DEBIAN_DEFAULT_SITE, FrontState
from gpufleet.model.secrets import Secret

# (content, or None: the file must not exist; mode); a Secret for what holds one
FrontFile = tuple[Secret | str | None, str]


def _text(content: Secret | str) -> str:
    return content.reveal() if isinstance(content, Secret) else content


@operation()
def configured(files: Mapping[str, FrontFile], package: str = "nginx"):
    """
    The front in place: nginx installed (from the distribution, when missing), Debian's
    default site disabled (its symlink; ``sites-available/default`` stays), and ``files``
    (the site, the key check, the TLS certificate and key) with their content and mode, root's.
    Files that change are swapped in together and ``nginx -t`` checks the whole configuration:
    if nginx refuses it, every file is put back as it was and the host fails with nginx's own
    error (the running nginx never saw it). The copies of replaced files are removed once nginx
    took the new ones (an old key does not linger). Contents are never shown (they may hold
    the API key). Nginx is not reloaded here (see ``reloaded``); a stopped or disabled nginx
    whose files are unchanged is started.

    + files: path -> (content, a ``Secret`` when it holds one, or None when the file must not
      exist; mode)
    + package: the Debian/Ubuntu package

    **Example:**

    .. code:: python

        front.configured(name="Front of llama3", files={
            "/etc/nginx/conf.d/gpufleet-llama3.conf": (Secret(site), "644"),
            "/etc/gpufleet/llama3.tls.key": (None, "600"),
        })
    """
    state = host.get_fact(FrontState, paths=sorted(files))
    changed = False
    if not state["nginx"]:
        yield StringCommand(
            "DEBIAN_FRONTEND=noninteractive", "apt-get", "update", "-q", "&&",
            "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-q",
            "--no-install-recommends", "-o", "Dpkg::Options::=--force-confold",
            QuoteString(package))
        changed = True
    if state["default_site"] or not state["nginx"]:  # the package's install enables it
        yield StringCommand("rm", "-f", DEBIAN_DEFAULT_SITE)
        changed = True
    differ = [path for path, (content, mode) in sorted(files.items())
              if _differs(state["files"].get(path), content, mode)]
    if differ:
        yield from _swap_checked(files, differ, state["files"])
    elif not changed and not (state["active"] and state["enabled"]):
        yield "systemctl enable --now nginx"
    elif not changed:
        host.noop("the front is up to date")


def _differs(info: Mapping[str, str] | None, content: Secret | str | None, mode: str) -> bool:
    if content is None:
        return info is not None
    wanted = hashlib.sha256(_text(content).encode()).hexdigest()
    return info is None or (info["sha256"], info["mode"], info["user"]) != (wanted, mode, "root")


def _swap_checked(files: Mapping[str, FrontFile], differ: list[str],
                  present: Mapping[str, object]):
    for path in differ:
        content, _ = files[path]
        if content is not None:
            yield FileUploadCommand(StringIO(_text(content)), f"{path}.gpufleet-new")
    swap, back, done = [], [], []
    for path in differ:
        content, mode = files[path]
        new, old = QuoteString(f"{path}.gpufleet-new"), QuoteString(f"{path}.gpufleet-previous")
        target = QuoteString(path)
        swap += (["cp", "-p", target, old, "&&"] if path in present
                 else ["rm", "-f", old, "&&"])
        if content is None:
            swap += ["rm", "-f", target, "&&"]
        else:
            swap += ["chown", "root:root", new, "&&", "chmod", mode, new, "&&",
                     "mv", "-f", new, target, "&&"]
        back += (["mv", "-f", old, target, ";"] if path in present
                 else ["rm", "-f", target, ";"])
        done += [old]
    yield StringCommand(
        *swap, "{", "nginx", "-t", "-q", "||", "{", *back, "echo",
        QuoteString("gpufleet: nginx refused the front's new config (its error above); the "
                    "previous files are back and nginx runs on as it was"), ">&2", ";",
        "exit", "1", ";", "}", ";", "}", "&&", "rm", "-f", *done)


@operation(is_idempotent=False)
def reloaded():
    """
    Enable nginx and reload it (start it when it is stopped): run it after ``configured``
    changed something, once nothing else holds the front's port.

    **Example:**

    .. code:: python

        front.reloaded(name="nginx reloaded", _if=config.did_change)
    """
    yield "systemctl enable nginx && systemctl reload-or-restart nginx"
