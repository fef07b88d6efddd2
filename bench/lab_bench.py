#!/usr/bin/env python3
"""Benchmark gpufleet on the lab: boot time, first deploy, no-op re-run, remote commands per host.

    python bench/lab_bench.py [--sizes 1 2 4 8] [--repeats 5] [--out docs/benchmark.md]

For each fleet size N: boot N lab hosts (h100 profile, cached images), run the deploy once (the
first deploy), then the no-op re-run ``--repeats`` times; report medians. Remote commands per
host are counted from pyinfra's ``-vv`` output of one extra no-op run (every fact and operation
command is one SSH exec). Run as root on a machine where ``gpufleet-lab up`` works.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlab import BIN, ROOT, lab_env

PREFIX, SUBNET = "gb", "10.216.0"


def sh(args: list[str], env: dict[str, str] | None = None) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.monotonic()
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    return time.monotonic() - t0, proc



def deploy(env: dict[str, str], *extra: str) -> tuple[float, subprocess.CompletedProcess]:
    return sh([str(BIN / "pyinfra"), "-y", "inventories/do.py", "deploys/llama3.py", *extra], env)


def remote_commands(output: str) -> dict[str, int]:
    """Count the commands pyinfra sent per host (-vv prints each as '[host] >>> command')."""
    counts: dict[str, int] = {}
    for line in output.splitlines():
        m = re.match(r"\s*\[([^\]]+)\] >>> ", line)
        if m:
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts


def bench_size(n: int, repeats: int) -> dict[str, float]:
    gf = [str(BIN / "gpufleet-lab"), "--prefix", PREFIX, "--subnet", SUBNET]
    sh(gf + ["down"])
    # the stand-in engine: this measures gpufleet's own overhead, and 8 real servers need 24 GiB
    boot, proc = sh(gf + ["up", "--hosts", str(n), "--profile", "h100", "--engine", "standin"])
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    env = lab_env(PREFIX, SUBNET)
    try:
        first, proc = deploy(env)
        if proc.returncode:
            raise SystemExit(proc.stdout[-3000:] + proc.stderr[-2000:])
        noops = []
        for _ in range(repeats):
            t, proc = deploy(env)
            if proc.returncode or "Grand total" not in proc.stdout + proc.stderr:
                raise SystemExit(proc.stdout[-3000:] + proc.stderr[-2000:])
            noops.append(t)
        _, proc = deploy(env, "-vv")
        counts = remote_commands(proc.stdout + proc.stderr)
    finally:
        sh(gf + ["down"])
    return {"hosts": n, "boot_s": boot, "first_s": first, "noop_s": statistics.median(noops),
            "noop_min_s": min(noops), "noop_max_s": max(noops),
            "commands_per_host": max(counts.values()) if counts else float("nan")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    rows = [bench_size(n, a.repeats) for n in a.sizes]
    base = rows[0]["noop_s"]
    lines = [
        f"| hosts | lab boot (s) | first deploy (s) | no-op re-run, median of {a.repeats} (s) "
        "| no-op vs 1 host | remote commands per host (no-op) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['hosts']} | {r['boot_s']:.1f} | {r['first_s']:.1f} | "
                     f"{r['noop_s']:.2f} ({r['noop_min_s']:.2f}–{r['noop_max_s']:.2f}) | "
                     f"{r['noop_s'] / base:.2f}x | {r['commands_per_host']} |")
    table = "\n".join(lines)
    print(table)
    if a.out:
        a.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
