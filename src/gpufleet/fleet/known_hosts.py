"""The project's known_hosts after a rebuild: one droplet's entries replaced, every other kept.

A rebuilt droplet presents a new host key, which pyinfra (rightly) refuses. ``gpufleet
rebuild`` replaces that droplet's entries only after the API reported the rebuild done: it
reads the one key the droplet presents (the type paramiko negotiates, the one pyinfra's
connection checks next), writes it for each of the droplet's addresses, keeps every other
line byte for byte (comments, markers, hashed entries of other hosts), and leaves the file it
replaced beside it as ``known_hosts.old``, as ``ssh-keygen -R`` does. Host-key checking is never
turned off.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class HostKey:
    type: str  # e.g. "ssh-ed25519"
    base64: str

    @property
    def fingerprint(self) -> str:
        """OpenSSH's form (``ssh-keygen -l``): ``SHA256:`` and the unpadded base64 digest."""
        digest = hashlib.sha256(base64.b64decode(self.base64)).digest()
        return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")

    def line(self, addresses: Sequence[str], port: int = 22) -> str:
        return f"{','.join(pattern(a, port) for a in addresses)} {self.type} {self.base64}\n"


def pattern(address: str, port: int = 22) -> str:
    """How known_hosts names an address: bare on port 22, ``[address]:port`` otherwise."""
    return address if port == 22 else f"[{address}]:{port}"


def _hashed_match(entry: str, name: str) -> bool:
    """``|1|salt|hash``: HMAC-SHA1 of the name keyed with the salt (OpenSSH's HashKnownHosts)."""
    try:
        _, magic, salt, digest = entry.split("|")
        if magic != "1":
            return False
        mac = hmac.new(base64.b64decode(salt), name.encode(), hashlib.sha1).digest()
        return hmac.compare_digest(mac, base64.b64decode(digest))
    except ValueError:
        return False


def names_address(line: str, addresses: Iterable[str], port: int = 22) -> bool:
    """Whether a known_hosts line is an entry for one of ``addresses`` (markers such as
    ``@cert-authority`` and comments are never a host's own entry)."""
    text = line.strip()
    if not text or text.startswith(("#", "@")):
        return False
    wanted = {pattern(a, port) for a in addresses}
    for entry in text.split(None, 1)[0].split(","):
        if entry.startswith("|"):
            if any(_hashed_match(entry, w) for w in wanted):
                return True
        elif entry in wanted:
            return True
    return False


def replaced(text: str, addresses: Sequence[str], key: HostKey, port: int = 22) -> str:
    """``text`` with every entry naming one of ``addresses`` removed and one line for ``key``
    at the end (pure)."""
    kept = [ln for ln in text.splitlines(keepends=True) if not names_address(ln, addresses, port)]
    if kept and not kept[-1].endswith("\n"):
        kept[-1] += "\n"
    return "".join(kept) + key.line(addresses, port)


def entries_for(text: str, address: str, port: int = 22) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if names_address(ln, [address], port)]


def replace_in_file(path: Path, addresses: Sequence[str], key: HostKey, port: int = 22) -> Path:
    """Write ``replaced`` into ``path`` atomically (mode 0600), the old file kept as
    ``<path>.old``; returns that backup's path."""
    try:
        old = path.read_text()
    except FileNotFoundError:
        old = ""
    backup = path.with_name(path.name + ".old")
    backup.write_text(old)
    os.chmod(backup, 0o600)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(replaced(old, addresses, key, port))
    os.replace(tmp, path)
    _forget_pyinfra_cache()
    return backup


def _forget_pyinfra_cache() -> None:
    """pyinfra 3.10 reads each known_hosts file once per process (``get_host_keys`` in
    ``pyinfra/connectors/sshuserclient/client.py`` is ``@memoize``d): a connection made after
    the file changed would still check the old key."""
    from pyinfra.connectors.sshuserclient import client

    cache = getattr(client.get_host_keys, "cache", None)
    if isinstance(cache, dict):
        cache.clear()


class KeyScanError(Exception):
    pass


def scan(address: str, port: int = 22, timeout: float = 10.0) -> HostKey:
    """The one host key the server presents to paramiko (no authentication, nothing trusted)."""
    import paramiko

    try:
        sock = socket.create_connection((address, port), timeout=timeout)
    except OSError as e:
        raise KeyScanError(f"{address}:{port}: {e}") from None
    transport = paramiko.Transport(sock)
    try:
        transport.start_client(timeout=timeout)
        key = transport.get_remote_server_key()
        return HostKey(key.get_name(), key.get_base64())
    except (paramiko.SSHException, OSError, EOFError) as e:
        raise KeyScanError(f"{address}:{port}: no SSH host key ({e})") from None
    finally:
        transport.close()
