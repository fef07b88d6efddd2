"""Small helpers shared by the lab's HTTP stand-ins (DigitalOcean API, Hub, registry)."""

from __future__ import annotations

from http.server import ThreadingHTTPServer


def base_url(server: ThreadingHTTPServer) -> str:
    """``http://host:port`` of a bound server."""
    host, port = server.server_address[:2]
    if isinstance(host, bytes):
        host = host.decode()
    return f"http://{host}:{port}"


def serve_until_interrupted(server: ThreadingHTTPServer) -> int:
    """Serve in the foreground until Ctrl-C (the stand-ins' command lines), then close."""
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
