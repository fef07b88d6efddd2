"""``gpufleet rollout``, ``gpufleet rollback`` and ``gpufleet releases``.

pyinfra's hosts run in gevent greenlets; without gevent's monkey-patching (done before
paramiko is imported, as pyinfra's own CLI does) the hosts of a batch would wait for each
other. ``gpufleet``'s entry point has imported pyinfra already, so these commands run in a
fresh interpreter that patches first (``_respawn``); the exit status is passed through.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

EXIT_STATUSES = """exit status: 0 completed, every host healthy; 1 completed with failed hosts
within --max-failed; 2 bad input or not confirmed; 3 aborted (failed hosts rolled back,
later batches untouched); 4 unreachable hosts at the start (nothing changed); 5 locked by
another run (nothing changed)"""

_BOOT = ("from gevent import monkey; monkey.patch_all()\n"
         "import sys\n"
         "from gpufleet.cli.fleet import run_json\n"
         "sys.exit(run_json(sys.argv[1]))\n")


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    """Entry from ``gpufleet``'s parser."""
    doc = {k: v for k, v in vars(args).items() if k != "func"}
    from gevent import monkey

    if monkey.is_module_patched("socket"):
        return run(doc)
    return _respawn(doc)


def _respawn(doc: dict[str, Any]) -> int:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(x for x in (root, env.get("PYTHONPATH")) if x)
    proc = subprocess.Popen([sys.executable, "-c", _BOOT, json.dumps(doc)], env=env)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:  # the child got it too: it releases its locks, wait for it
            continue


def run_json(text: str) -> int:
    return run(json.loads(text))


def run(doc: dict[str, Any]) -> int:
    from gpufleet.cli.data import DataError, parse_data
    from gpufleet.fleet import rollout

    os.environ.setdefault("PYINFRA_PROGRESS", "off")
    _quiet_pyinfra()
    out = sys.stdout
    live = Printer(sys.stderr if doc.get("json") else sys.stdout)
    try:
        data = parse_data(doc.get("data") or [])
        if doc["command"] == "releases":
            return _releases(doc, data, out)
        opts = rollout.Options(
            command=doc["command"], inventory=doc["inventory"], deploy=doc.get("deploy"),
            data=data, canary=doc.get("canary", 0), batch=doc.get("batch", "25%"),
            pause=doc.get("pause", 0.0), max_failed=doc.get("max_failed", 0),
            skip_unreachable=doc.get("skip_unreachable", False), order=doc.get("order"),
            limit=doc.get("limit") or None, break_lock=doc.get("break_lock", False),
            wait=doc.get("wait", 0.0),
            to_release=doc.get("to_release"), service=doc.get("service"),
        )
        if not doc.get("yes"):
            if doc.get("json"):
                opts.plan_only = True
            else:
                opts.confirm = _ask
        report = rollout.Driver(opts, live).run()
    except (rollout.RolloutError, DataError) as e:
        print(f"gpufleet {doc['command']}: {e}", file=sys.stderr)
        return rollout.USAGE
    except KeyboardInterrupt:
        print(f"gpufleet {doc['command']}: interrupted (locks released)", file=sys.stderr)
        return 130
    if doc.get("json"):
        json.dump(report.as_dict(), out, indent=2)
        out.write("\n")
    else:
        print_report(report, out)
    return report.exit_code


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


def _releases(doc: dict[str, Any], data: dict[str, Any], out: TextIO) -> int:
    from gpufleet.fleet import rollout

    service, rows = rollout.list_releases(doc["inventory"], service=doc.get("service"),
                                          data=data, limit=doc.get("limit") or None)
    if doc.get("json"):
        json.dump({"service": service, "hosts": rows}, out, indent=2)
        out.write("\n")
        return 0
    table = [("host", "current", "previous", "created", "quantization", "note")]
    for r in rows:
        if "error" in r:
            table.append((r["host"], "-", "-", "-", "-", r["error"]))
            continue
        note = []
        if r.get("drift"):
            note.append("unit differs from current (a deploy did not finish)")
        if r.get("lock"):
            holder = r["lock"] or {}
            note.append(f"locked by {holder.get('who', '?')} ({holder.get('command', '?')} "
                        f"{holder.get('id', '?')}, since {holder.get('started', '?')})")
        table.append((r["host"], _short(r["current"]), _short(r["previous"]),
                      _short(r["created"]), _short(r["quantization"]), "; ".join(note)))
    out.write(f"service {service}\n")
    _table(table, out)
    return 0
