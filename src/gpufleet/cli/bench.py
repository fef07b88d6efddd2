"""``gpufleet bench INVENTORY [HOST]``: ``vllm bench serve`` on a host (``gpufleet.fleet.bench``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="vLLM's own benchmark (vllm bench serve, from the pinned "
                                     "image) against a host, the blog's method by default")
    p.add_argument("inventory")
    p.add_argument("host", nargs="?", help="the host (default: the first with a release)")
    p.add_argument("--lb", action="store_true",
                   help="through the service's load balancer (gpufleet cloud), run from a host")
    p.add_argument("--service", help="the service (default: the one recorded on the hosts)")
    p.add_argument("--num-prompts", type=int, default=100, metavar="N")
    p.add_argument("--concurrency", type=int, default=20, metavar="N")
    p.add_argument("--input-len", type=int, default=512, metavar="TOKENS")
    p.add_argument("--output-len", type=int, default=128, metavar="TOKENS")
    p.add_argument("--compare", metavar="previous|FILE",
                   help="set this run against an earlier one: 'previous' (this host's last "
                        "run kept on the controller) or a result JSON")
    p.add_argument("--sweep", metavar="KEY=V1,V2,...",
                   help="deploy each value of a spec key on the host in turn (rollout --limit), "
                        "benchmark each, then put the host's release back")
    p.add_argument("--deploy", default="deploys/llama3.py", help="the deploy --sweep rolls out "
                                                                  "(default %(default)s)")
    p.add_argument("--max-p99-ttft", type=float, metavar="MS",
                   help="--sweep's latency bound for the best value (default: none)")
    p.add_argument("--drain", type=float, default=15.0, metavar="S",
                   help="--sweep's drain from the load balancer, as the rollout's")
    p.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                   help="override inventory data, as pyinfra --data")
    p.add_argument("--json", action="store_true", help="vLLM's result JSON and the summary")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from gpufleet.cli.data import DataError, parse_data
    from gpufleet.cli.fleet import _quiet_pyinfra
    from gpufleet.fleet import bench
    from gpufleet.fleet.cloud import CloudError
    from gpufleet.fleet.report import USAGE, RolloutError

    os.environ.setdefault("PYINFRA_PROGRESS", "off")
    _quiet_pyinfra()
    work = bench.Workload(args.num_prompts, args.concurrency, args.input_len, args.output_len)
    if args.sweep:
        return sweep_main(args, work)
    try:
        if min(work.num_prompts, work.concurrency, work.input_len, work.output_len) < 1:
            raise RolloutError("--num-prompts, --concurrency, --input-len and --output-len "
                               "must be at least 1")
        service, host, result, kept = bench.run_bench(
            args.inventory, host=args.host, service=args.service, work=work,
            data=parse_data(args.data or []), base_url=lb_address() if args.lb else None)
        rows = [(f"this run ({result.get('quantization')})", bench.summary(result))]
        if args.compare:
            before = (bench.earlier(service, host, kept.name) if args.compare == "previous"
                      else Path(args.compare))
            if before is None or not before.is_file():
                raise RolloutError(f"nothing to compare with: {args.compare} (no earlier run "
                                   f"of {host} kept in {bench.local_dir(service, host)})")
            earlier = json.loads(before.read_text())
            rows.insert(0, (f"{before.name[:16]} ({earlier.get('quantization')})",
                            bench.summary(earlier)))
    except (RolloutError, DataError, ValueError, CloudError) as e:
        print(f"gpufleet bench: {e}", file=sys.stderr)
        return USAGE
    except KeyboardInterrupt:
        return 130
    if args.json:
        json.dump({"service": service, "host": host, "kept": str(kept),
                   "summary": [{"run": name, **row} for name, row in rows],
                   "result": result}, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        where = "the load balancer" if args.lb else host
        print(f"vllm bench serve on {where} ({service}, release {result.get('release')}): "
              f"{work.describe()}")
        sys.stdout.write(bench.table(rows))
        print(f"result JSON: {kept} (and on the host next to its release record)")
    return 0 if not result.get("failed") else 1


def lb_address() -> str:
    """The service's load balancer as ``gpufleet cloud`` made it (the inventory's environment)."""
    from gpufleet.clients.digitalocean import DigitalOceanClient
    from gpufleet.clients.do_inventory import settings_from_env
    from gpufleet.fleet import cloud
    from gpufleet.model.cloud import resource_name

    settings = settings_from_env(os.environ)
    lb = cloud.find_load_balancer(DigitalOceanClient(settings.token, settings.api_url),
                                  settings.tag)
    if lb is None or not lb.get("ip"):
        raise cloud.CloudError(f"the service has no load balancer with an address "
                               f"({resource_name(settings.tag)}): run gpufleet cloud")
    return cloud.lb_url(lb)


def sweep_main(args: argparse.Namespace, work: Any) -> int:
    from gpufleet.cli.data import DataError, parse_data
    from gpufleet.fleet import sweep
    from gpufleet.fleet.report import USAGE, RolloutError

    try:
        if args.lb or not args.host:
            raise RolloutError("--sweep changes one host: name it (not --lb)")
        key, values = sweep.parse_sweep(args.sweep)
        data = parse_data(args.data or [])
        steps = sweep.lab_steps(args.inventory, args.deploy, args.service, work, data,
                                args.drain)
        points, (restored, how) = sweep.sweep(args.host, key, values, data, steps,
                                              emit=lambda line: print(line, file=sys.stderr))
    except (RolloutError, DataError) as e:
        print(f"gpufleet bench: {e}", file=sys.stderr)
        return USAGE
    except KeyboardInterrupt:
        return 130
    chosen = sweep.best(points, args.max_p99_ttft)
    if args.json:
        json.dump({"host": args.host, "key": key, "restored": restored,
                   "best": None if chosen is None else chosen.value,
                   "points": [p.__dict__ for p in points]}, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        bound = f", p99 TTFT <= {args.max_p99_ttft:g} ms" if args.max_p99_ttft else ""
        print(f"sweep of {key} on {args.host}: {work.describe()}")
        sys.stdout.write(sweep.table(key, points, chosen))
        print(f"best{bound}: " + (f"{key}={chosen.value}" if chosen else "none"))
        print(f"{args.host} restored: {how}" if restored else
              f"{args.host} NOT restored: {how}")
    return 0 if restored and chosen is not None else 1
