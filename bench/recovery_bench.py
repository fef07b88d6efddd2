#!/usr/bin/env python3
"""Benchmark disaster recovery: ``gpufleet drill`` on a lab host, time per phase.

    python bench/recovery_bench.py [--repeats 3] [--engine real|standin] [--profile h100] [--json]

Boots a two-host lab (prefix rb, subnet 10.225.0; the second host keeps serving, as a drill
needs), deploys it with plain pyinfra, then drills host 1 ``--repeats`` times: each run the
emulator really wipes the host (fresh root filesystem, new SSH host key) and the deploy brings it
back. Per run, the report's phases (API action, boot to SSH, toolkit and docker, image pull,
weights, cold start, verification, other operations) and the recovery time, their sum; medians
are printed. The lab is taken down at the end (``--keep`` leaves it up).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from benchlab import BIN, ROOT, lab, lab_env

PREFIX, SUBNET = "rb", "10.225.0"
HOST = "llama3-gpu-01"
KEY = "sk-recovery-bench-0123456789abcdef"  # one key: every rebuild gets the same release



def one_drill(env: dict[str, str]) -> dict[str, float | str]:
    proc = subprocess.run([str(BIN / "gpufleet"), "drill", "inventories/do.py", HOST, "--yes",
                           "--json"], cwd=ROOT, env=env, capture_output=True, text=True)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        raise SystemExit(f"drill failed ({proc.returncode}): {proc.stderr[-2000:]}") from None
    host = report["hosts"][0]
    if proc.returncode != 0:
        raise SystemExit(f"drill failed ({proc.returncode}): {report['message']} {host['detail']}")
    return {**host["phases"], "recovery": host["total_s"], "release": host["release_after"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--engine", choices=("real", "standin"), default="real")
    p.add_argument("--profile", default="h100", help="the lab profile of both hosts")
    p.add_argument("--json", action="store_true", help="print the medians as JSON")
    p.add_argument("--keep", action="store_true", help="leave the lab up")
    a = p.parse_args()
    lab(PREFIX, SUBNET, "down")
    lab(PREFIX, SUBNET, "up", "--hosts", "2", "--profile", a.profile, "--engine", a.engine)
    try:
        env = {**lab_env(PREFIX, SUBNET), "VLLM_API_KEY": KEY}
        proc = subprocess.run([str(BIN / "pyinfra"), "-y", "inventories/do.py",
                               "deploys/llama3.py"], cwd=ROOT, env=env, capture_output=True,
                              text=True)
        if proc.returncode:
            raise SystemExit(f"the first deploy failed:\n{proc.stdout[-3000:]}")
        runs = [one_drill(env) for _ in range(a.repeats)]
    finally:
        if not a.keep:
            lab(PREFIX, SUBNET, "down")
    releases = {r.pop("release") for r in runs}
    keys = [k for k in runs[0] if all(k in r for r in runs)]
    medians = {k: round(statistics.median(float(r[k]) for r in runs), 1) for k in keys}
    if a.json:
        print(json.dumps({"engine": a.engine, "profile": a.profile, "repeats": a.repeats,
                          "releases": sorted(releases), "median": medians, "runs": runs},
                         indent=2))
        return 0
    print(f"gpufleet drill of one lab host ({a.profile}, {a.engine} vLLM), median of "
          f"{a.repeats} runs (seconds); release after every run: {', '.join(sorted(releases))}")
    for key, value in medians.items():
        print(f"  {key:<20} {value:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
