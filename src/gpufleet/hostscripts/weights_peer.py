#!/usr/bin/env python3
"""Serve this host's staged weights to its peers on the private network, for one run.

    weights_peer.py serve --repo-dir /opt/models/hub/models--org--name --bind 10.0.0.5
                          [--port 8790] [--expiry 120] [--marker REPO/.gpufleet/COMMIT.complete]

A host that has a model staged (``stage_weights.py``) hands its blobs to a host that needs them,
so a fleet fetches each file from the Hub once. The controller starts this over its own SSH
channel (the script on stdin, as ``hostlock.py``) and sends one line, ``TOKEN <secret>``: the
bearer token a peer must present (a fresh one per run, in no command line). This answers
``SERVING <address>:<port>`` once it listens, or ``ERROR <why>``. It serves while the channel
lives: EOF, or no line (``PING``) for ``--expiry`` seconds, ends it, and it prints ``SERVED
<bytes> <requests>`` on the way out.

Only ``GET /blobs/<sha256 or git blob id>`` of complete blobs under ``--repo-dir`` (no partial
file, no path outside it), with ``Range: bytes=N-`` for a resumed transfer. The peer verifies
what it gets against the manifest it has from the Hub's metadata, so a wrong answer costs a
download, never a bad file. Standard library only.
"""

from __future__ import annotations

import argparse
import hmac
import http.server
import os
import re
import select
import sys
import threading

PORT = 8790
EXPIRY = 120.0
CHUNK = 1 << 20
_BLOB = re.compile(r"^/blobs/([0-9a-f]{40}|[0-9a-f]{64})$")


def say(line: str) -> None:
    try:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        raise SystemExit(0) from None


class Served:
    def __init__(self) -> None:
        self.bytes = 0
        self.requests = 0
        self.lock = threading.Lock()


def make_handler(blobs: str, token: str, served: Served) -> type:
    expected = f"Bearer {token}".encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass  # nothing of a request is logged (the token is in its headers)

        def _refuse(self, code: int, why: str) -> None:
            body = (why + "\n").encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            given = self.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                self._refuse(401, "a peer token is required")
                return
            m = _BLOB.match(self.path)
            path = os.path.join(blobs, m.group(1)) if m else ""
            if not m or not os.path.isfile(path) or os.path.islink(path):
                self._refuse(404, "no such blob")
                return
            size = os.path.getsize(path)
            start = 0
            rng = re.match(r"^bytes=(\d+)-$", self.headers.get("Range", ""))
            if rng:
                start = int(rng.group(1))
                if start >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            self.send_response(206 if rng else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size - start))
            self.send_header("ETag", f'"{m.group(1)}"')
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            self.end_headers()
            sent = 0
            with open(path, "rb") as f:
                f.seek(start)
                while block := f.read(CHUNK):
                    self.wfile.write(block)
                    sent += len(block)
            with served.lock:
                served.bytes += sent
                served.requests += 1

    return Handler


def wait_for_the_run(expiry: float) -> None:
    """Until EOF on stdin, or silence for ``expiry`` seconds (a cut link)."""
    while True:
        ready, _, _ = select.select([0], [], [], expiry)
        if not ready or not os.read(0, 65536):
            return


def serve(repo_dir: str, bind: str, port: int, expiry: float, marker: str | None = None) -> int:
    # the same text buffer the boot line read the script from (it may hold this line already)
    line = sys.stdin.readline().strip()
    verb, _, token = line.partition(" ")
    if verb != "TOKEN" or len(token) < 16:
        say("ERROR no token")
        return 2
    blobs = os.path.join(repo_dir, "blobs")
    if not os.path.isdir(blobs) or (marker and not os.path.isfile(marker)):
        say(f"ERROR the weights are not staged completely in {repo_dir}")
        return 1
    served = Served()
    try:
        server = http.server.ThreadingHTTPServer((bind, port), make_handler(blobs, token, served))
    except OSError as e:
        say(f"ERROR cannot listen on {bind}:{port}: {e.strerror or e}")
        return 1
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="weights-peer", daemon=True).start()
    say(f"SERVING {bind}:{server.server_address[1]}")
    try:
        wait_for_the_run(expiry)
    finally:
        server.shutdown()
        server.server_close()
    print(f"SERVED {served.bytes} {served.requests}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="weights_peer.py", description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("serve",))
    p.add_argument("--repo-dir", required=True)
    p.add_argument("--bind", required=True, help="the host's private (VPC) address")
    p.add_argument("--port", type=int, default=PORT)
    p.add_argument("--expiry", type=float, default=EXPIRY)
    p.add_argument("--marker", help="serve only if this completion marker exists (the commit "
                                    "is staged completely)")
    a = p.parse_args(argv)
    return serve(a.repo_dir, a.bind, a.port, a.expiry, a.marker)


if __name__ == "__main__":
    sys.exit(main())
