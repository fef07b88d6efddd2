"""Install gpufleet's small host files (its host scripts) with one fact command per run."""

from __future__ import annotations

import hashlib
from io import BytesIO

from pyinfra import host
from pyinfra.api import FileUploadCommand, QuoteString, StringCommand, operation

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
