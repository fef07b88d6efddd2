"""gpufleet's small host files (its host scripts, one fact command per run) and the host
directories it owns (created when missing, never re-permissioned)."""

from __future__ import annotations

import hashlib
from io import BytesIO

from pyinfra import host
from pyinfra.api import FileUploadCommand, OperationError, QuoteString, StringCommand, operation
from pyinfra.facts.files import Directory, Link

from gpufleet.facts.hostfiles import FileDigests


@operation()
def installed(files: dict[str, bytes | str], mode: str = "755"):
    """
    Make sure each ``dest -> content`` file is on the host with that content, ``mode`` and owner
    root. One fact command checks them all (``files.put`` needs three per file), so a no-op run
    stays cheap.

    + files: destination path -> content
    + mode: the files' mode

    **Example:**

    .. code:: python

        hostfiles.installed(
            name="gpufleet host scripts",
            files={"/usr/local/lib/gpufleet/verify_endpoint.py": b"#!/usr/bin/env python3 ..."},
        )
    """
    have = host.get_fact(FileDigests, paths=sorted(files))
    done = True
    for dest in sorted(files):
        content = files[dest]
        content = content.encode() if isinstance(content, str) else content
        now = have.get(dest) or {}
        if now.get("sha256") != hashlib.sha256(content).hexdigest():
            done = False
            yield StringCommand("mkdir", "-p", QuoteString(dest.rsplit("/", 1)[0]))
            yield FileUploadCommand(BytesIO(content), dest)
        if now.get("mode") != mode or now.get("user") != "root" or not done:
            done = False
            yield StringCommand("chown", "root:root", QuoteString(dest), "&&",
                                "chmod", mode, QuoteString(dest))
    if done:
        host.noop(f"{len(files)} file(s) up to date")


@operation()
def directory_created(path: str, mode: str = "755"):
    """
    Create the directory ``path`` (with its parents, owner root:root, ``mode``) when it is
    missing. An existing directory, or a symlink the admin put there, is left exactly as it is:
    its mode and owner are never changed (``files.directory`` would chmod ``/root`` to 0755).
    A file in its place fails the host and is left alone.

    + path: absolute directory (already validated and normalized by the spec)
    + mode: the mode of a newly created directory

    **Example:**

    .. code:: python

        hostfiles.directory_created(name="Model store /opt/models", path="/opt/models")
    """
    info = host.get_fact(Directory, path=path)
    if info:
        host.noop(f"{path} exists (mode {info['mode']}, owner {info['user']}:{info['group']}), "
                  "left as it is")
        return
    if info is False:
        link = host.get_fact(Link, path=path)
        if link:
            host.noop(f"{path} is a symlink to {link.get('link_target')}, left as it is")
            return
        raise OperationError(f"{path} exists and is not a directory: move it away or choose "
                             "another directory in the spec")
    parent = path.rsplit("/", 1)[0] or "/"
    # mkdir without -p fails rather than touch a directory that appeared meanwhile
    yield StringCommand("mkdir", "-p", QuoteString(parent), "&&",
                        "mkdir", "-m", mode, QuoteString(path), "&&",
                        "chown", "root:root", QuoteString(path))
