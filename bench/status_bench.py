#!/usr/bin/env python3
"""Benchmark ``gpufleet status`` on 1 host against 8 hosts of a lab.

    python bench/status_bench.py [--repeats 5] [--hosts 8] [--json] [--keep]

Boots a lab (prefix gs, subnet 10.226.0, h100 hosts, the stand-in engine: eight real vLLM
servers do not fit this machine, and status reads the same routes of both), deploys them with
plain pyinfra, then times ``gpufleet status inventories/do.py --json`` ``--repeats`` times
with ``--limit`` one host and ``--repeats`` times over all hosts, alternating. Each time is the
command as the user runs it (interpreter start, inventory from the DigitalOcean API, SSH
connections, one status command per host). Prints the medians and their ratio, which issue 12
wants within 1.5.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from benchlab import BIN, ROOT, lab, lab_env

PREFIX, SUBNET = "gs", "10.226.0"


def timed_status(env: dict[str, str], limit: str | None) -> tuple[float, int]:
    cmd = [str(BIN / "gpufleet"), "status", "inventories/do.py", "--json"]
    if limit:
        cmd += ["--limit", limit]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"gpufleet status failed ({proc.returncode}): {proc.stderr[-500:]}")
    rows = json.loads(proc.stdout)["hosts"]
    healthy = sum(1 for r in rows if r.get("health") == 200 and r.get("metrics"))
    return took, healthy


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--hosts", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--keep", action="store_true", help="leave the lab up")
    a = p.parse_args()
    lab(PREFIX, SUBNET, "down")
    lab(PREFIX, SUBNET, "up", "--hosts", str(a.hosts), "--profile", "h100",
        "--engine", "standin")
    try:
        env = lab_env(PREFIX, SUBNET)
        deploy = subprocess.run([str(BIN / "pyinfra"), "-y", "inventories/do.py",
                                 "deploys/llama3.py"], cwd=ROOT, env=env, capture_output=True,
                                text=True)
        if deploy.returncode:
            raise SystemExit("the deploy failed:\n" + deploy.stdout[-2000:])
        one, all_hosts = [], []
        for _ in range(a.repeats):
            took, healthy = timed_status(env, "llama3-gpu-01")
            assert healthy == 1, healthy
            one.append(round(took, 3))
            took, healthy = timed_status(env, None)
            assert healthy == a.hosts, healthy
            all_hosts.append(round(took, 3))
    finally:
        if not a.keep:
            lab(PREFIX, SUBNET, "down")
    m1, mn = statistics.median(one), statistics.median(all_hosts)
    result = {"hosts": a.hosts, "repeats": a.repeats, "one_host_s": one,
              f"{a.hosts}_hosts_s": all_hosts, "median_one_s": round(m1, 3),
              f"median_{a.hosts}_s": round(mn, 3), "ratio": round(mn / m1, 3)}
    if a.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"gpufleet status, median of {a.repeats} (seconds, the whole command)")
    print(f"  1 host    {m1:6.2f}   runs {one}")
    print(f"  {a.hosts} hosts   {mn:6.2f}   runs {all_hosts}")
    print(f"  ratio     {mn / m1:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
