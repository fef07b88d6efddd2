"""``gpufleet rebuild``, ``gpufleet drill``, ``gpufleet snapshot`` and ``gpufleet snapshots``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, TextIO

from gpufleet.cli.fleet import Printer, _table

EXIT_STATUSES = """exit status: 0 every host rebuilt and healthy; 1 a host failed (the last
batch); 2 bad input, refused or not confirmed (nothing changed); 3 a batch failed and later
batches were not touched"""
SNAPSHOT_EXIT_STATUSES = """exit status: 0 snapshot taken and the host healthy again; 1 the
snapshot or the deploy after it failed; 2 bad input or refused (nothing changed)"""
DEFAULT_DEPLOY = "deploys/llama3.py"


def add_parser(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("inventory")
    common.add_argument("--deploy", default=DEFAULT_DEPLOY,
                        help=f"the deploy that makes a server of a host (default {DEFAULT_DEPLOY})")
    common.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                        help="override data, as pyinfra --data")
    common.add_argument("--json", action="store_true",
                        help="the report as JSON on stdout (live lines go to stderr)")
    common.add_argument("--action-timeout", type=float, default=1800.0, metavar="S",
                        help="seconds an API action (rebuild, snapshot) may take (default 1800)")
    common.add_argument("--ssh-timeout", type=float, default=900.0, metavar="S",
                        help="seconds from the rebuild's end to SSH (default 900)")
    ask = argparse.ArgumentParser(add_help=False)
    ask.add_argument("--yes", "-y", action="store_true", help="do not ask before rebuilding")
    source = argparse.ArgumentParser(add_help=False)
    group = source.add_mutually_exclusive_group()
    group.add_argument("--image", metavar="SLUG", help="rebuild from this image (default: the "
                                                       "droplet's own image)")
    group.add_argument("--snapshot", type=int, metavar="ID", help="rebuild from this snapshot")

    r = sub.add_parser("rebuild", parents=[common, ask, source], epilog=EXIT_STATUSES,
                       help="rebuild droplets through the API and deploy them again (disaster "
                            "recovery), timed by phase")
    r.add_argument("hosts", nargs="+", metavar="HOST")
    r.add_argument("--batch", default="1", metavar="N|P%",
                   help="hosts rebuilt at once (default 1)")
    r.add_argument("--force", action="store_true",
                   help="also rebuild when no other host of the service is healthy")
    r.set_defaults(func=main)

    d = sub.add_parser("drill", parents=[common, ask, source], epilog=EXIT_STATUSES,
                       help="rebuild one healthy host on purpose and print its recovery time")
    d.add_argument("hosts", nargs=1, metavar="HOST")
    d.set_defaults(func=main, batch="1", force=False)

    s = sub.add_parser("snapshot", parents=[common], epilog=SNAPSHOT_EXIT_STATUSES,
                       help="snapshot a served droplet as a golden image (its secrets left "
                            "out), then serve again")
    s.add_argument("hosts", nargs=1, metavar="HOST")
    s.add_argument("--name", help="the snapshot's name (default: HOST-YYYYmmdd-HHMMSS)")
    s.add_argument("--force", action="store_true",
                   help="also when no other host of the service is healthy")
    s.set_defaults(func=snapshot_main, yes=True, image=None, snapshot=None, batch="1")

    ls = sub.add_parser("snapshots", help="the account's droplet snapshots")
    ls.add_argument("inventory")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=snapshots_main)


def main(args: argparse.Namespace, make: Any = None) -> int:
    from gpufleet.cli.data import DataError, parse_data
    from gpufleet.fleet.recovery import RebuildOptions, Recovery
    from gpufleet.fleet.report import USAGE, RolloutError

    os.environ.setdefault("PYINFRA_PROGRESS", "off")
    import logging

    logging.getLogger("pyinfra").setLevel(logging.CRITICAL)
    live = Printer(sys.stderr if args.json else sys.stdout)
    try:
        opts = RebuildOptions(
            inventory=args.inventory, deploy=args.deploy, hosts=list(args.hosts),
            command=args.command, image=args.image, snapshot=args.snapshot, batch=args.batch,
            force=args.force, data=parse_data(args.data or []),
            action_timeout=args.action_timeout, ssh_timeout=args.ssh_timeout)
        if not args.yes:
            opts.confirm = _ask
        run = make(opts, live) if make is not None else Recovery(opts, live)
        report = run.run()
    except (RolloutError, DataError) as e:
        print(f"gpufleet {args.command}: {e}", file=sys.stderr)
        return USAGE
    except KeyboardInterrupt:
        print(f"gpufleet {args.command}: interrupted", file=sys.stderr)
        return 130
    extra = getattr(run, "snapshot", None)
    if args.json:
        doc = report.as_dict()
        if extra is not None:
            doc["snapshot"] = dict(extra.__dict__)
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_report(report, sys.stdout)
        if extra is not None and extra.snapshot_id is not None:
            size = f", {extra.size_gigabytes:g} GB" if extra.size_gigabytes is not None else ""
            print(f"snapshot {extra.snapshot_id} {extra.name!r}{size}; left out of it: "
                  f"{', '.join(extra.scrubbed)}. Rebuild from it: gpufleet rebuild "
                  f"{args.inventory} HOST --snapshot {extra.snapshot_id}")
    return report.exit_code


def _ask(report: Any) -> bool:
    out = sys.stdout
    out.write(f"gpufleet {report.command} will rebuild {len(report.hosts)} droplet(s), "
              f"{len(report.batches)} batch(es) (service {report.service or 'unknown'}):\n")
    for h in report.hosts:
        state = "healthy" if h.healthy_before else "not healthy"
        out.write(f"  {h.host} (droplet {h.droplet_id}, {state}, release "
                  f"{h.release_before or '-'}) from image {h.image}\n")
    out.write("Their disks are wiped: weights, the pulled image, /etc/gpufleet, the release "
              "records and logs are lost; the deploy then puts the pinned server back.\n")
    if not sys.stdin.isatty():
        print("not a terminal: pass --yes to go ahead", file=sys.stderr)
        return False
    return input("Rebuild? [y/N] ").strip().lower() in ("y", "yes")


def print_report(report: Any, out: TextIO) -> None:
    from gpufleet.fleet.recovery import phase_order

    used = phase_order({p: 0.0 for h in report.hosts for p in h.phases})
    rows = [("host", "result", "release before", "after", *used, "recovery")]
    for h in report.hosts:
        rows.append((h.host, h.result, h.release_before or "-", h.release_after or "-",
                     *(f"{h.phases[p]:.1f}s" if p in h.phases else "-" for p in used),
                     f"{h.total_s:.1f}s"))
    out.write("\n")
    _table(rows, out)
    for h in report.hosts:
        if h.fingerprint:
            out.write(f"  {h.host}: host key {h.fingerprint}\n")
        if h.detail:
            out.write(f"  {h.host}: {h.detail}\n")
    out.write(f"\n{report.command} {report.result} (exit {report.exit_code})"
              + (f": {report.message}" if report.message else "") + "\n")


def _client() -> Any:
    from gpufleet.clients import do_inventory
    from gpufleet.clients.digitalocean import DigitalOceanClient

    settings = do_inventory.settings_from_env(os.environ)
    return DigitalOceanClient(settings.token, settings.api_url)


def snapshot_main(args: argparse.Namespace) -> int:
    import time

    from gpufleet.fleet.golden import GoldenSnapshot

    name = args.name or f"{args.hosts[0]}-{time.strftime('%Y%m%d-%H%M%S')}"
    return main(args, make=lambda opts, live: GoldenSnapshot(opts, live, name=name))


def snapshots_main(args: argparse.Namespace) -> int:
    from pyinfra.api.exceptions import PyinfraError

    from gpufleet.clients.digitalocean import DigitalOceanError

    try:
        snaps = _client().list_droplet_snapshots()
    except (PyinfraError, DigitalOceanError) as e:
        print(f"gpufleet snapshots: {e}", file=sys.stderr)
        return 2
    if args.json:
        json.dump([s.__dict__ for s in snaps], sys.stdout, indent=2, default=list)
        sys.stdout.write("\n")
        return 0
    rows = [("id", "name", "created", "size", "droplet")]
    for s in snaps:
        rows.append((str(s.id), s.name, s.created_at or "-",
                     f"{s.size_gigabytes:g} GB" if s.size_gigabytes is not None else "-",
                     str(s.resource_id or "-")))
    _table(rows, sys.stdout)
    return 0
