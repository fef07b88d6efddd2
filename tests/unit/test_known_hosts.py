"""The project's known_hosts after a rebuild: one droplet's entries replaced, every other kept.

Keys, fingerprints and the hashed entry were made with OpenSSH's own tools (``ssh-keygen -t
ed25519``, ``ssh-keygen -l``, ``ssh-keygen -H``)."""

from __future__ import annotations

import stat
from pathlib import Path

from gpufleet.fleet import known_hosts as kh
from gpufleet.fleet.known_hosts import HostKey

NEW = HostKey("ssh-ed25519", "AAAAC3NzaC1lZDI1NTE5AAAAIE5GA/HLy28kgnC0Fuutten6xyrEWT5QgOtBduByBz7E")
NEW_FINGERPRINT = "SHA256:hZp0HPHEyLuUZImyy9daoDRHwA7MX+ZgMKq5aDixDKE"  # ssh-keygen -l
HASHED_10_0_0_5 = "|1|ORCgrps7Z8mX2Ouxy6oSsOzHH/0=|xoij50SpimmN0oApuWmCmnxBzuw="  # ssh-keygen -H
OLD = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOLDOLDOLDOLDOLDOLDOLDOLDOLDOLDOLDOLDOLDOLDOLD"
OTHER = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOTHEROTHEROTHEROTHEROTHEROTHEROTHEROTHER"

FILE = f"""# the project's known_hosts
10.0.0.5,10.1.0.5 {OLD}
10.0.0.50 {OTHER}
[10.0.0.5]:2222 {OTHER}
@cert-authority 10.0.0.5 {OTHER}
10.0.0.6 {OTHER}
"""


def test_the_fingerprint_is_openssh_s():
    assert NEW.fingerprint == NEW_FINGERPRINT


def test_only_the_droplet_s_entries_are_replaced_and_every_other_line_kept():
    out = kh.replaced(FILE, ["10.0.0.5", "10.1.0.5"], NEW)
    lines = out.splitlines()
    assert lines[-1] == f"10.0.0.5,10.1.0.5 {NEW.type} {NEW.base64}"
    assert f"10.0.0.5,10.1.0.5 {OLD}" not in lines
    # another address that starts the same, another port, a CA marker, another host: untouched
    for kept in ("# the project's known_hosts", f"10.0.0.50 {OTHER}", f"[10.0.0.5]:2222 {OTHER}",
                 f"@cert-authority 10.0.0.5 {OTHER}", f"10.0.0.6 {OTHER}"):
        assert kept in lines
    assert len(lines) == 6
    assert kh.entries_for(out, "10.0.0.5") == [f"10.0.0.5,10.1.0.5 {NEW.type} {NEW.base64}"]


def test_a_hashed_entry_of_the_address_is_replaced_too():
    text = f"{HASHED_10_0_0_5} {OLD}\n10.0.0.6 {OTHER}\n"
    assert kh.names_address(f"{HASHED_10_0_0_5} {OLD}", ["10.0.0.5"])
    assert not kh.names_address(f"{HASHED_10_0_0_5} {OLD}", ["10.0.0.6"])
    assert kh.replaced(text, ["10.0.0.5"], NEW) == (f"10.0.0.6 {OTHER}\n"
                                                   f"10.0.0.5 {NEW.type} {NEW.base64}\n")


def test_a_non_standard_port_is_written_in_brackets():
    out = kh.replaced(FILE, ["10.0.0.5"], NEW, port=2222)
    assert f"[10.0.0.5]:2222 {OTHER}" not in out
    assert out.endswith(f"[10.0.0.5]:2222 {NEW.type} {NEW.base64}\n")
    assert f"10.0.0.5,10.1.0.5 {OLD}" in out


def test_the_file_is_replaced_atomically_0600_with_the_old_one_kept(tmp_path: Path):
    path = tmp_path / "known_hosts"
    path.write_text(FILE.rstrip("\n"))  # no newline at the end: the new line is not glued on
    backup = kh.replace_in_file(path, ["10.0.0.5", "10.1.0.5"], NEW)
    assert backup == tmp_path / "known_hosts.old" and backup.read_text() == FILE.rstrip("\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert path.read_text().splitlines()[-2:] == [f"10.0.0.6 {OTHER}",
                                                  f"10.0.0.5,10.1.0.5 {NEW.type} {NEW.base64}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["known_hosts", "known_hosts.old"]


def test_a_missing_file_is_created(tmp_path: Path):
    path = tmp_path / "known_hosts"
    kh.replace_in_file(path, ["10.0.0.5"], NEW)
    assert path.read_text() == f"10.0.0.5 {NEW.type} {NEW.base64}\n"


def test_scanning_an_address_without_ssh_is_one_error():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        kh.scan("127.0.0.1", port, timeout=2)
    except kh.KeyScanError as e:
        assert f"127.0.0.1:{port}" in str(e)
    else:
        raise AssertionError("no error")
