"""Run a vLLM server as a systemd unit and prove it answers."""

from __future__ import annotations

import hashlib
from io import StringIO

from pyinfra import host
from pyinfra.api import FileUploadCommand, QuoteString, StringCommand, operation

from gpufleet.facts.hostfiles import FileDigests
from gpufleet.facts.vllm import VllmEndpoint
from gpufleet.model.names import VERIFY_SCRIPT
from gpufleet.model.secrets import Secret


@operation()
def secret_file(path: str, content: Secret | None, mode: str = "600", dir_mode: str = "700",
                present: bool = True, read_with: list[str] | None = None):
    """
    Write a root-only file holding secrets, without ever showing its content: no command line,
    no ``--diff``, no output. Compared by SHA-256, uploaded over SFTP into a root-only directory
    and moved into place atomically. With ``present=False`` the file is removed (a secret that
    is no longer set must not linger on the host).

    + path: the file to write (its directory is created root-only)
    + content: the file's content, a ``gpufleet.model.secrets.Secret`` (None with ``present=False``)
    + mode: the file's mode
    + dir_mode: the mode of its directory
    + present: whether the file should exist
    + read_with: the other secret files of the service: every call that passes the same list
      reads all of them with one fact command (a no-op run stays cheap)

    **Example:**

    .. code:: python

        vllm.secret_file(
            name="Env file for llama3",
            path="/etc/gpufleet/llama3.env",
            content=Secret("VLLM_API_KEY=...\\n"),
            read_with=["/etc/gpufleet/llama3.hf-token"],
        )
        vllm.secret_file(
            name="No Hub token file for llama3 (public model)",
            path="/etc/gpufleet/llama3.hf-token",
            content=None,
            present=False,
        )
    """
    paths = sorted({path, *(read_with or [])})
    info = host.get_fact(FileDigests, paths=paths).get(path)
    if not present:
        if info:
            yield StringCommand("rm", "-f", QuoteString(path))
        else:
            host.noop(f"{path} does not exist")
        return
    if content is None:
        raise TypeError("secret_file: content is required unless present=False")
    directory = path.rsplit("/", 1)[0] or "/"
    text = content.reveal()
    wanted = hashlib.sha256(text.encode()).hexdigest()
    same_content = bool(info) and info.get("sha256") == wanted
    right_mode = bool(info) and info.get("mode") == mode and info.get("user") == "root"
    if same_content and right_mode:
        host.noop(f"{path} is up to date")
        return
    yield StringCommand("install", "-d", "-m", dir_mode, "-o", "root", "-g", "root",
                        QuoteString(directory))
    if not same_content:
        tmp = f"{path}.gpufleet-new"
        yield FileUploadCommand(StringIO(text), tmp)
        yield StringCommand("chown", "root:root", QuoteString(tmp), "&&", "chmod", mode,
                            QuoteString(tmp), "&&", "mv", "-f", QuoteString(tmp),
                            QuoteString(path))
    else:
        yield StringCommand("chown", "root:root", QuoteString(path), "&&", "chmod", mode,
                            QuoteString(path))


@operation()
def endpoint_verified(url: str, served_name: str, env_file: str, container: str, unit: str,
                      timeout: int = 1200, url_file: str | None = None):
    """
    Prove the service's endpoint answers, from the host itself, through its front (``url``): ``/health`` 200 within ``timeout``
    seconds (a cold start takes minutes), ``/v1/models`` lists ``served_name``, and one short chat
    completion succeeds with the API key. A healthy endpoint is a no-op; otherwise this waits,
    and fails the host with the container's last log lines if it does not come up.

    + url: the front as the host reaches it (``http://127.0.0.1:8000``; https: its certificate is
      not checked, the name is the host's own)
    + url_file: read the URL on the host from this file (the front's, ``names.front_url_file``)
      when it is there: a rollback or rebuild checks the front as it is now
    + served_name: the model name clients use
    + env_file: the root-only env file holding VLLM_API_KEY
    + container: the container name, for its logs
    + unit: the systemd unit, to notice a crash loop early
    + timeout: cold-start budget in seconds
    """
    read = {"url_file": url_file} if url_file else {}
    probe = host.get_fact(VllmEndpoint, url=url, served_name=served_name, env_file=env_file,
                          container=container, unit=unit, **read)
    if probe.get("ok"):
        host.noop(f"endpoint answers: {probe.get('detail')}")
        return
    yield StringCommand(
        "python3", VERIFY_SCRIPT, "--wait", QuoteString(str(timeout)), "--url",
        QuoteString(url), *(["--url-file", QuoteString(url_file)] if url_file else []),
        "--served-name", QuoteString(served_name), "--env-file",
        QuoteString(env_file), "--container", QuoteString(container), "--unit", QuoteString(unit),
    )
