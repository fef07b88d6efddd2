#!/usr/bin/env python3
"""Benchmark disaster recovery: ``gpufleet drill`` on a lab host, time per phase, from the base
image and from a golden snapshot.

    python bench/recovery_bench.py [--repeats 3] [--from both|base|snapshot]
                                   [--engine real|standin] [--profile h100] [--json]

Boots a two-host lab (prefix rb, subnet 10.225.0; the second host keeps serving, as a drill
needs) and deploys it with plain pyinfra. From the base image: drills host 1 ``--repeats``
times; each run the emulator really wipes the host (fresh root filesystem, new SSH host key)
and the deploy brings it back. From a snapshot: ``gpufleet snapshot`` of host 2 once (timed
too), then host 1 drilled ``--repeats`` times from it (the emulator's rebuild lays the
snapshot's disk down, with a new host key). Per run, the report's phases (API action, boot to
SSH, toolkit and docker, image pull, weights, cold start, verification, other operations) and
the recovery time, their sum; medians are printed, and the ratio of the two recoveries. The lab
is taken down at the end (``--keep`` leaves it up).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from benchlab import BIN, ROOT, lab, lab_env

PREFIX, SUBNET = "rb", "10.225.0"
HOST, OTHER = "llama3-gpu-01", "llama3-gpu-02"
KEY = "sk-recovery-bench-0123456789abcdef"  # one key: every rebuild gets the same release


def gpufleet_json(env: dict[str, str], *args: str) -> dict:
    proc = subprocess.run([str(BIN / "gpufleet"), *args, "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        raise SystemExit(f"{args[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}") from None
    if proc.returncode != 0:
        host = report["hosts"][0] if report.get("hosts") else {}
        raise SystemExit(f"{args[0]} failed ({proc.returncode}): {report.get('message')} "
                         f"{host.get('detail')}")
    return report


def one_drill(env: dict[str, str], *source: str) -> dict[str, float | str]:
    report = gpufleet_json(env, "drill", "inventories/do.py", HOST, "--yes", *source)
    host = report["hosts"][0]
    return {**host["phases"], "recovery": host["total_s"], "release": host["release_after"]}


def medians_of(runs: list[dict[str, float | str]]) -> dict[str, float]:
    keys = [k for k in runs[0] if k != "release" and all(k in r for r in runs)]
    return {k: round(statistics.median(float(r[k]) for r in runs), 1) for k in keys}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--from", dest="source", choices=("both", "base", "snapshot"),
                   default="both", help="what host 1 is rebuilt from (default both)")
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
        runs: dict[str, list[dict[str, float | str]]] = {}
        snapshot: dict = {}
        if a.source in ("both", "base"):
            runs["base image"] = [one_drill(env) for _ in range(a.repeats)]
        if a.source in ("both", "snapshot"):
            report = gpufleet_json(env, "snapshot", "inventories/do.py", OTHER, "--name",
                                   "bench-gold")
            snapshot = {**report["snapshot"], "phases": report["hosts"][0]["phases"],
                        "took": report["hosts"][0]["total_s"]}
            ident = str(snapshot["snapshot_id"])
            runs["snapshot"] = [one_drill(env, "--snapshot", ident) for _ in range(a.repeats)]
    finally:
        if not a.keep:
            lab(PREFIX, SUBNET, "down")
    releases = sorted({str(r["release"]) for rs in runs.values() for r in rs})
    medians = {source: medians_of(rs) for source, rs in runs.items()}
    ratio = (round(medians["base image"]["recovery"] / medians["snapshot"]["recovery"], 2)
             if len(medians) == 2 else None)
    if a.json:
        print(json.dumps({"engine": a.engine, "profile": a.profile, "repeats": a.repeats,
                          "releases": releases, "median": medians, "base_over_snapshot": ratio,
                          "snapshot": snapshot, "runs": runs}, indent=2))
        return 0
    print(f"gpufleet drill of one lab host ({a.profile}, {a.engine} vLLM), median of "
          f"{a.repeats} runs (seconds); release after every run: {', '.join(releases)}")
    sources = list(medians)
    keys = list(dict.fromkeys(k for m in medians.values() for k in m))
    print(f"  {'phase':<20}" + "".join(f"{s:>12}" for s in sources))
    for key in keys:
        print(f"  {key:<20}" + "".join(f"{medians[s].get(key, 0.0):12.1f}" for s in sources))
    if ratio is not None:
        print(f"  base image / snapshot recovery: {ratio:.2f}x")
    if snapshot:
        print(f"  the snapshot ({snapshot['size_gigabytes']} GB) took {snapshot['took']:.1f}s: "
              + ", ".join(f"{k} {v:.1f}" for k, v in snapshot["phases"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
