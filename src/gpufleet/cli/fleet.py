"""``gpufleet rollout``, ``gpufleet rollback`` and ``gpufleet releases``.

pyinfra's hosts run in gevent greenlets: the hosts of a batch run at once only under gevent's
monkey-patching, which ``gpufleet.cli.main`` does when it is imported, before pyinfra is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from gpufleet.fleet.rollout import Options

EXIT_STATUSES = """exit status: 0 completed, every host healthy; 1 completed with failed hosts
within --max-failed; 2 bad input or not confirmed; 3 aborted (failed hosts rolled back,
later batches untouched); 4 unreachable hosts at the start (nothing changed); 5 locked by
another run (nothing changed)"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    from gpufleet.fleet.lb_gate import DEFAULT_DRAIN

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--limit", action="append", default=[], metavar="HOST",
                        help="only these hosts (repeatable)")
    common.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                        help="override data, as pyinfra --data (e.g. quantization=fp16)")
    common.add_argument("--json", action="store_true",
                        help="the report as JSON on stdout (live lines go to stderr)")

    moving = argparse.ArgumentParser(add_help=False)
    moving.add_argument("--batch", default="25%", metavar="N|P%",
                        help="hosts per batch after the canary: a number or a percentage of "
                             "the fleet (default 25%%)")
    moving.add_argument("--pause", type=float, default=0.0, metavar="S",
                        help="seconds to wait between batches (default 0)")
    moving.add_argument("--max-failed", type=int, default=0, metavar="N",
                        help="failed hosts a batch may have before the rollout stops "
                             "(default 0)")
    moving.add_argument("--drain", type=float, default=DEFAULT_DRAIN, metavar="S",
                        help="with the service's load balancer: seconds between a host leaving "
                             "it and its restart, for requests in flight (default %(default)g)")
    moving.add_argument("--yes", "-y", action="store_true",
                        help="do not ask before changing anything")
    moving.add_argument("--skip-unreachable", action="store_true",
                        help="go on without hosts unreachable at the start")
    moving.add_argument("--order", type=lambda s: [x for x in s.split(",") if x], default=None,
                        metavar="HOST,HOST,...", help="these hosts first, in this order "
                        "(default: sorted names)")
    moving.add_argument("--break-lock", action="store_true",
                        help="end a hung run that holds the lock on a host (say whose) "
                             "before taking it")
    moving.add_argument("--wait", type=float, default=0.0, metavar="S",
                        help="wait up to S seconds for a lock another run holds (default: "
                             "refuse at once)")

    p = sub.add_parser("rollout", parents=[common, moving], epilog=EXIT_STATUSES,
                       help="roll a deploy over the fleet: canary, batches, health gates")
    p.add_argument("inventory")
    p.add_argument("deploy")
    p.add_argument("--canary", type=int, default=1, metavar="N",
                   help="hosts in the first batch (default 1)")
    p.set_defaults(func=main)

    r = sub.add_parser("rollback", parents=[common, moving], epilog=EXIT_STATUSES,
                       help="put hosts back on their previous release (no download)")
    r.add_argument("inventory")
    r.add_argument("--to", dest="to_release", metavar="RELEASE",
                   help="this release instead of each host's previous one")
    r.add_argument("--service", help="the service (default: the one recorded on the hosts)")
    r.set_defaults(func=main)

    s = sub.add_parser("releases", parents=[common],
                       help="current and previous release of every host")
    s.add_argument("inventory")
    s.add_argument("--service", help="the service (default: the one recorded on the hosts)")
    s.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Entry from ``gpufleet``'s parser: run the command, print its report, return its exit
    status (130 when interrupted: the run released its locks on the way out)."""
    from gpufleet.cli.data import DataError, parse_data
    from gpufleet.fleet import rollout
    from gpufleet.fleet.report import USAGE, RolloutError

    os.environ.setdefault("PYINFRA_PROGRESS", "off")
    _quiet_pyinfra()
    out = sys.stdout
    live = Printer(sys.stderr if args.json else sys.stdout)
    try:
        data = parse_data(args.data or [])
        if args.command == "releases":
            return _releases(args, data, out)
        report = rollout.Driver(_options(args, data), live).run()
    except (RolloutError, DataError) as e:
        print(f"gpufleet {args.command}: {e}", file=sys.stderr)
        return USAGE
    except KeyboardInterrupt:
        print(f"gpufleet {args.command}: interrupted (locks released)", file=sys.stderr)
        return 130
    if args.json:
        json.dump(report.as_dict(), out, indent=2)
        out.write("\n")
    else:
        print_report(report, out)
    return report.exit_code


def _options(args: argparse.Namespace, data: dict[str, Any]) -> Options:
    """The driver's options from the command line (a rollback has no canary, a rollout no
    ``--to``/``--service``)."""
    from gpufleet.fleet import rollout

    opts = rollout.Options(
        command=args.command, inventory=args.inventory, deploy=getattr(args, "deploy", None),
        data=data, canary=getattr(args, "canary", 0), batch=args.batch, pause=args.pause,
        max_failed=args.max_failed, skip_unreachable=args.skip_unreachable, order=args.order,
        limit=args.limit or None, break_lock=args.break_lock, wait=args.wait,
        to_release=getattr(args, "to_release", None), service=getattr(args, "service", None),
        drain=args.drain,
    )
    if not args.yes:
        if args.json:
            opts.plan_only = True
        else:
            opts.confirm = _ask
    return opts


def _quiet_pyinfra() -> None:
    """pyinfra logs each host's progress and errors; the live lines and the report say it."""
    import logging

    logging.getLogger("pyinfra").setLevel(logging.CRITICAL)


def _ask(report: Any) -> bool:
    print_plan(report, sys.stdout)
    if not sys.stdin.isatty():
        print("not a terminal: pass --yes to go ahead", file=sys.stderr)
        return False
    answer = input("Go ahead? [y/N] ").strip().lower()
    return answer in ("y", "yes")


class Printer:
    """Live lines: ``HH:MM:SS host  what`` (rollout-wide lines have no host)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.width = 14

    def emit(self, host: str | None, text: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        if host is None:
            self.stream.write(f"{stamp}  {text}\n")
        else:
            self.width = max(self.width, len(host))
            self.stream.write(f"{stamp}    {host:<{self.width}}  {text}\n")
        self.stream.flush()


def _short(value: str | None) -> str:
    return value or "-"


def _table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                  + "\n")


def print_plan(report: Any, out: TextIO) -> None:
    out.write(f"{report.command} of {report.service} over {len(report.hosts)} hosts:\n")
    for batch in report.batches:
        out.write(f"  {batch['label']:<9} {', '.join(batch['hosts'])}\n")
    for h in report.hosts:
        out.write(f"  {h.host:<16} {_short(h.from_release)} -> {_short(h.to_release)}"
                  f"{'  (' + h.result + ')' if h.batch is None else ''}\n")


def print_report(report: Any, out: TextIO) -> None:
    rows = [("host", "batch", "from release", "to release", "result", "time")]
    for h in report.hosts:
        rows.append((h.host, h.batch or "-", _short(h.from_release), _short(h.to_release),
                     h.result, f"{h.seconds:.1f}s" if h.seconds is not None else "-"))
    out.write("\n")
    _table(rows, out)
    details = [(h.host, h.detail) for h in report.hosts if h.detail]
    for host, detail in details:
        out.write(f"  {host}: {detail}\n")
    total = report.timings.get("total_s", 0.0)
    out.write(f"\n{report.command} {report.id} {report.result} in {total:.1f}s"
              f" (exit {report.exit_code})" + (f": {report.message}" if report.message else "")
              + "\n")
    if report.audit_missing:
        out.write(f"no audit line on {', '.join(report.audit_missing)}: the host did not "
                  "answer at the end (its lock went with the connection)\n")


def _releases(args: argparse.Namespace, data: dict[str, Any], out: TextIO) -> int:
    from gpufleet.fleet.releases_listing import list_releases

    service, rows = list_releases(args.inventory, service=args.service, data=data,
                                  limit=args.limit or None)
    if args.json:
        json.dump({"service": service, "hosts": rows}, out, indent=2)
        out.write("\n")
        return 0
    table = [("host", "current", "previous", "created", "quantization", "note")]
    for r in rows:
        if "error" in r:
            table.append((r["host"], "-", "-", "-", "-", r["error"]))
            continue
        table.append((r["host"], _short(r["current"]), _short(r["previous"]),
                      _short(r["created"]), _short(r["quantization"]), _release_note(r)))
    out.write(f"service {service}\n")
    _table(table, out)
    return 0


def _release_note(row: dict[str, Any]) -> str:
    note = []
    if row.get("drift"):
        note.append("unit differs from current (a deploy did not finish)")
    if row.get("lock"):
        holder = row["lock"] or {}
        note.append(f"locked by {holder.get('who', '?')} ({holder.get('command', '?')} "
                    f"{holder.get('id', '?')}, since {holder.get('started', '?')})")
    return "; ".join(note)
