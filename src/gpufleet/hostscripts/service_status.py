#!/usr/bin/env python3
"""One host's view of a service, for ``gpufleet status``: one line of JSON on stdout.

    service_status.py --root /var/lib/gpufleet [--service NAME]

Without --service, the one service with releases recorded under --root (several: the first by
name, and ``services`` lists them all).

What it reads, each part on its own so one failure does not hide the rest:
  gpus, driver   nvidia-smi (name, memory used and total per GPU, driver version)
  release        the ``current`` release record (id, created, model, commit, endpoint)
  unit           systemctl: active state, since when, restarts
  health         GET <endpoint>/health (the front, as a load balancer asks)
  metrics        GET <endpoint>/metrics from the host itself (the front allows only the host
                 and metrics_from): vllm:num_requests_running, vllm:num_requests_waiting,
                 vllm:kv_cache_usage_perc, summed over engines
  uptime_s       /proc/uptime

The controller sends it with the command (``python3 -c``), like release_records.py; standard
library only.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import subprocess
import time
import urllib.error
import urllib.request

GPU_FIELDS = "name,memory.used,memory.total,driver_version"
METRICS = {"vllm:num_requests_running": "running", "vllm:num_requests_waiting": "waiting",
           "vllm:kv_cache_usage_perc": "kv_cache_usage"}


def run(argv: list[str], timeout: float = 10) -> tuple[int, str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return 127, str(e)
    return proc.returncode, proc.stdout if proc.returncode == 0 else proc.stderr or proc.stdout


def gpus() -> dict:
    rc, out = run(["nvidia-smi", f"--query-gpu={GPU_FIELDS}", "--format=csv,noheader,nounits"])
    if rc != 0:
        return {"gpus": [], "driver": None, "gpu_error": f"nvidia-smi exit {rc}: "
                                                          f"{out.strip()[:200]}"}
    rows = []
    driver = None
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        name, used, total, driver = parts
        rows.append({"name": name, "memory_used_mib": _number(used),
                     "memory_total_mib": _number(total)})
    return {"gpus": rows, "driver": driver, "gpu_error": None}


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def release(service_dir: str) -> dict | None:
    try:
        with open(os.path.join(service_dir, "current", "release.json"), encoding="utf-8") as f:
            record = json.loads(f.readline())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def unit(name: str) -> dict:
    rc, out = run(["systemctl", "show", name, "-p", "ActiveState", "-p", "SubState",
                   "-p", "NRestarts", "-p", "ActiveEnterTimestampMonotonic"])
    if rc != 0:
        return {"active": "unknown", "sub": out.strip()[:100], "since_s": None, "restarts": None}
    props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    entered = int(props.get("ActiveEnterTimestampMonotonic") or 0)
    since = time.clock_gettime(time.CLOCK_MONOTONIC) - entered / 1e6 if entered else None
    restarts = props.get("NRestarts", "")
    return {"active": props.get("ActiveState", "unknown"), "sub": props.get("SubState", ""),
            "since_s": since if props.get("ActiveState") == "active" else None,
            "restarts": int(restarts) if restarts.isdigit() else None}


def get(url: str, timeout: float = 5) -> tuple[int, str]:
    context = None
    if url.startswith("https:"):
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
            return resp.status, resp.read(4 << 20).decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, ""
    except (urllib.error.URLError, OSError) as e:
        return 0, str(getattr(e, "reason", e))


def parse_metrics(text: str) -> dict:
    """The three gauges gpufleet shows, summed over their label sets (one per engine)."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in METRICS:
            try:
                value = float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
            key = METRICS[name]
            found[key] = found.get(key, 0.0) + value
    return found


def recorded_services(root: str) -> list[str]:
    try:
        names = sorted(n for n in os.listdir(root) if not n.startswith("."))
    except OSError:
        return []
    return [n for n in names if os.path.isdir(os.path.join(root, n, "releases"))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True)
    p.add_argument("--service")
    a = p.parse_args()
    found = recorded_services(a.root)
    service = a.service or (found[0] if found else None)
    status: dict = {**gpus(), "service": service, "services": found,
                    "unit": unit(f"gpufleet-{service}.service") if service else
                    {"active": "none", "sub": "", "since_s": None, "restarts": None},
                    "release": release(os.path.join(a.root, service)) if service else None}
    endpoint = None
    if status["release"]:
        rec = status["release"]
        endpoint = rec.get("endpoint") or f"http://127.0.0.1:{int(rec.get('port', 8000))}"
        try:  # the front as it is now (its TLS may have changed since the release)
            with open(os.path.join(a.root, service, "front.url"), encoding="utf-8") as f:
                endpoint = f.read().strip().rstrip("/") or endpoint
        except OSError:
            pass
    status["health"], status["metrics"], status["metrics_error"] = None, None, None
    if endpoint:
        status["health"] = get(endpoint + "/health")[0]
        code, body = get(endpoint + "/metrics")
        if code == 200:
            status["metrics"] = parse_metrics(body)
        else:
            status["metrics_error"] = f"/metrics answered {code or body[:100]}"
    try:
        with open("/proc/uptime", encoding="ascii") as f:
            status["uptime_s"] = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        status["uptime_s"] = None
    print(json.dumps(status, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
