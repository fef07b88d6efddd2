#!/usr/bin/env python3
"""Benchmark the rollout's own overhead beyond the health waits, on 4 lab hosts.

    python bench/rollout_bench.py [--repeats 5] [--hosts 4] [--json]

Boots a lab (prefix gr, subnet 10.218.0, h100 hosts), deploys release A with plain pyinfra,
then runs ``gpufleet rollout --json --yes`` with the default plan (canary 1, batches of 25%)
``--repeats`` times, switching between two releases (fp16 and fp8) so every run changes every
host. Per run, from the outside clock and the report's timings:

* ``wall``: the command as the user sees it (interpreter start included);
* ``health wait``: time spent in the deploy's health gate (``endpoint_verified``: restart to
  a verified endpoint, the stand-in's cold start is 2 s);
* ``overhead`` = wall - health wait: everything the rollout adds around the waits, which is
  ``deploy ops`` (the deploy's own operations besides the gate: facts, unit, restart, record)
  plus the ``driver`` (interpreter and inventory, preflight, lock, a connection per batch,
  audit and unlock).

Medians are printed. The lab is taken down at the end (``--keep`` leaves it up).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from benchlab import BIN, ROOT, lab, lab_env

PREFIX, SUBNET = "gr", "10.218.0"


def run(args: list[str], env: dict[str, str] | None = None) -> tuple[float, str, int]:
    t0 = time.monotonic()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    return time.monotonic() - t0, proc.stdout, proc.returncode if proc.returncode else 0



def one_rollout(env: dict[str, str], quantization: str) -> dict[str, float]:
    wall, out, rc = run([str(BIN / "gpufleet"), "rollout", "inventories/do.py",
                         "deploys/llama3.py", "--yes", "--json", "--data",
                         f"quantization={quantization}"], env)
    report = json.loads(out)
    if rc != 0 or report["result"] != "completed":
        raise SystemExit(f"rollout failed ({rc}): {report['message']}")
    t = report["timings"]
    health = t.get("deploy_health_wait_s", 0.0)
    ops = t.get("deploy_ops_s", 0.0)
    return {"wall": wall, "health wait": health, "overhead": wall - health,
            "deploy ops": ops - health, "driver": wall - ops,
            "preflight": t.get("preflight_s", 0.0), "lock": t.get("lock_s", 0.0),
            "finish": t.get("finish_s", 0.0), "batches": len(report["batches"])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--hosts", type=int, default=4)
    p.add_argument("--json", action="store_true", help="print the medians as JSON")
    p.add_argument("--keep", action="store_true", help="leave the lab up")
    a = p.parse_args()
    lab(PREFIX, SUBNET, "down")
    lab(PREFIX, SUBNET, "up", "--hosts", str(a.hosts), "--profile", "h100", "--engine", "standin")  # overhead, not vLLM
    try:
        env = lab_env(PREFIX, SUBNET)
        _, _, rc = run([str(BIN / "pyinfra"), "-y", "inventories/do.py", "deploys/llama3.py"],
                       env)
        if rc:
            raise SystemExit("the first deploy failed")
        runs = [one_rollout(env, "fp16" if i % 2 == 0 else "fp8") for i in range(a.repeats)]
    finally:
        if not a.keep:
            lab(PREFIX, SUBNET, "down")
    medians = {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}
    if a.json:
        print(json.dumps({"hosts": a.hosts, "repeats": a.repeats, "median": medians,
                          "runs": runs}, indent=2))
        return 0
    print(f"gpufleet rollout, {a.hosts} lab hosts, default plan ({medians['batches']:.0f} "
          f"batches), median of {a.repeats} runs (seconds)")
    for key, value in medians.items():
        if key != "batches":
            print(f"  {key:<12} {value:7.2f}")
    per_batch = medians["overhead"] / max(1, medians["batches"])
    print(f"  overhead per batch {per_batch:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
