"""``gpufleet status INVENTORY``: one line per host (``gpufleet.fleet.status``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="every host of the service at a glance: GPUs, release, "
                                      "unit, health, requests, KV cache")
    p.add_argument("inventory")
    p.add_argument("--service", help="the service (default: the one recorded on the hosts)")
    p.add_argument("--limit", action="append", default=[], metavar="HOST",
                   help="only these hosts (repeatable)")
    p.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                   help="override inventory data, as pyinfra --data")
    p.add_argument("--json", action="store_true", help="the rows as JSON")
    p.add_argument("--watch", type=float, nargs="?", const=5.0, default=None, metavar="S",
                   help="read again every S seconds (default 5) until interrupted")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from gpufleet.cli.data import DataError, parse_data
    from gpufleet.cli.fleet import _quiet_pyinfra
    from gpufleet.fleet import status
    from gpufleet.fleet.report import USAGE, RolloutError

    os.environ.setdefault("PYINFRA_PROGRESS", "off")
    _quiet_pyinfra()
    try:
        data = parse_data(args.data or [])
        while True:
            t0 = time.monotonic()
            service, rows = status.fleet_status(args.inventory, service=args.service, data=data,
                                                limit=args.limit or None)
            took = time.monotonic() - t0
            if args.json:
                json.dump({"service": service, "seconds": round(took, 2), "hosts": rows},
                          sys.stdout, indent=None if args.watch else 2, sort_keys=True)
                sys.stdout.write("\n")
            else:
                if args.watch and sys.stdout.isatty():
                    sys.stdout.write("\033[H\033[2J")
                sys.stdout.write(status.render(service, rows))
                sys.stdout.write(f"read in {took:.1f}s at {time.strftime('%H:%M:%S')}\n")
            sys.stdout.flush()
            if not args.watch:
                return 1 if any("error" in r for r in rows) else 0
            time.sleep(max(0.0, args.watch - took))
    except (RolloutError, DataError) as e:
        print(f"gpufleet status: {e}", file=sys.stderr)
        return USAGE
    except KeyboardInterrupt:
        return 130
