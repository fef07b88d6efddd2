#!/usr/bin/env python3
"""Verify a vLLM OpenAI-compatible endpoint from the host it runs on (installed by gpufleet).

Reads the API key from the root-only env file, so it never appears on a command line. --url is
the service's front as the host reaches it (https: the certificate is not checked, since the host
asks itself by address).
  --quick       one probe of /health, /v1/models and a tiny chat completion; prints JSON; exit 0
  --wait SECS   wait up to SECS for /health (the cold start), then check /v1/models lists the
                served name and one short chat completion succeeds; on failure print why and the
                container's last log lines, exit 1
Standard library only: it runs with the host's python3.
"""

from __future__ import annotations

import argparse
import json
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request


def read_key(env_file: str) -> str | None:
    try:
        with open(env_file, encoding="utf-8") as f:
            for line in f:
                if line.startswith("VLLM_API_KEY="):
                    return line.split("=", 1)[1].strip().strip("'\"")
    except OSError:
        return None
    return None


def request(url: str, key: str | None = None, body: dict | None = None,
            timeout: float = 10.0) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    context = None
    if url.startswith("https:"):
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        return 0, str(getattr(e, "reason", e)).encode()


def check_models_and_chat(base: str, key: str | None, served: str) -> tuple[str | None, str]:
    """Return (failed stage or None, detail)."""
    status, body = request(f"{base}/v1/models", key)
    if status != 200:
        return "models", f"/v1/models answered {status}: {body[:200].decode(errors='replace')}"
    try:
        ids = [m["id"] for m in json.loads(body)["data"]]
    except (ValueError, KeyError, TypeError):
        return "models", f"/v1/models answered something unexpected: {body[:200]!r}"
    if served not in ids:
        return "models", f"/v1/models lists {ids}, not the served name {served!r}"
    status, body = request(f"{base}/v1/chat/completions", key, {
        "model": served, "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": "Say OK."}],
    }, timeout=120)
    if status != 200:
        return "chat", f"chat completion answered {status}: {body[:200].decode(errors='replace')}"
    try:
        text = json.loads(body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return "chat", f"chat completion answered something unexpected: {body[:200]!r}"
    return None, f"served {served!r}, completion: {text!r}"


def front_url(url_file: str | None, default: str) -> str:
    try:
        with open(url_file or "", encoding="utf-8") as f:
            return f.read().strip().rstrip("/") or default.rstrip("/")
    except OSError:
        return default.rstrip("/")


def restarts(unit: str) -> int:
    out = subprocess.run(["systemctl", "show", "-p", "NRestarts", "--value", unit],
                         capture_output=True, text=True).stdout.strip()
    return int(out) if out.isdigit() else 0


def journal_logs(unit: str, lines: int = 40) -> str:
    out = subprocess.run(["journalctl", "-u", unit, "-n", str(lines), "--no-pager", "-o", "cat"],
                         capture_output=True, text=True)
    return out.stdout.strip()


def container_logs(container: str, unit: str, lines: int = 40) -> str:
    out = subprocess.run(["docker", "logs", "--tail", str(lines), container],
                         capture_output=True, text=True)
    text = (out.stdout + out.stderr).strip()
    if out.returncode != 0 or not text:
        text = journal_logs(unit, lines)
    return text or "(no log lines)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--url-file", help="read the URL from this file (the front writes it); "
                                      "--url when it is missing")
    p.add_argument("--served-name", required=True)
    p.add_argument("--env-file", required=True)
    p.add_argument("--container", required=True)
    p.add_argument("--unit", required=True)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true")
    mode.add_argument("--wait", type=int)
    a = p.parse_args()
    base = front_url(a.url_file, a.url)
    key = read_key(a.env_file)

    if a.quick:
        status, _ = request(f"{base}/health", timeout=5)
        if status != 200:
            print(json.dumps({"ok": False, "stage": "health", "detail": f"/health: {status}"}))
            return 0
        stage, detail = check_models_and_chat(base, key, a.served_name)
        print(json.dumps({"ok": stage is None, "stage": stage, "detail": detail}))
        return 0

    start, first_restarts = time.monotonic(), restarts(a.unit)
    status, body = 0, b""
    while time.monotonic() - start < a.wait:
        status, body = request(f"{base}/health", timeout=5)
        if status == 200:
            break
        if restarts(a.unit) - first_restarts >= 2:
            # the journal, not the container: systemd has already started a new container, whose
            # log holds none of the failed start's lines
            print(f"vLLM keeps crashing: {a.unit} restarted {restarts(a.unit) - first_restarts} "
                  f"times while waiting for /health. Last log lines of {a.container}:\n"
                  f"{journal_logs(a.unit) or '(no log lines)'}", file=sys.stderr)
            return 1
        time.sleep(2)
    waited = time.monotonic() - start
    if status != 200:
        print(f"/health did not answer 200 within {a.wait}s (last: {status or 'no connection'} "
              f"{body[:100].decode(errors='replace')}). Last log lines of {a.container}:\n"
              f"{container_logs(a.container, a.unit)}", file=sys.stderr)
        return 1
    stage, detail = check_models_and_chat(base, key, a.served_name)
    if stage is not None:
        print(f"{detail}. Last log lines of {a.container}:\n{container_logs(a.container, a.unit)}",
              file=sys.stderr)
        return 1
    print(f"healthy after {waited:.0f}s; {detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
