"""``gpufleet cloud [SPEC]``: the service's DigitalOcean load balancer and firewall
(``gpufleet.fleet.cloud``), from the spec and the inventory's environment (DIGITALOCEAN_TOKEN,
DIGITALOCEAN_API_URL, GPUFLEET_TAG)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpufleet.fleet.cloud import CloudPlan


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cloud", help="the service's DigitalOcean load balancer and cloud "
                                     "firewall, by tag: created or updated, --dry shows the diff")
    p.add_argument("spec", type=Path, nargs="?", default=Path("deploys/llama3.yaml"))
    p.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec key, as pyinfra --data does")
    p.add_argument("--dry", action="store_true", help="show what would change, change nothing")
    p.add_argument("--json", action="store_true", help="the plan (and the address) as JSON")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from gpufleet.cli.data import DataError, parse_data
    from gpufleet.clients.digitalocean import DigitalOceanClient, DigitalOceanError
    from gpufleet.clients.do_inventory import settings_from_env
    from gpufleet.fleet import cloud
    from gpufleet.model.spec import load_spec

    try:
        spec = load_spec(args.spec, overrides=parse_data(args.data or []), environ=os.environ)
        settings = settings_from_env(os.environ)
        client = DigitalOceanClient(settings.token, settings.api_url)
        the_plan = cloud.plan(client, spec, settings.tag)
        emit = (lambda _: None) if args.json else print
        if not args.json:
            sys.stdout.write(cloud.render_plan(the_plan))
        lb = the_plan.load_balancer.current
        if args.dry:
            if not args.json:
                print("dry run: nothing changed" if the_plan.changes_anything
                      else "nothing to change")
        elif the_plan.changes_anything or not (lb and lb.get("ip")):
            lb = cloud.apply(client, the_plan, emit=emit)
        elif not args.json:
            print("nothing to change")
        url = f"{cloud.lb_url(lb)}/v1" if lb and lb.get("ip") else None
        if args.json:
            json.dump(plan_json(the_plan, url, applied=not args.dry), sys.stdout, indent=2)
            sys.stdout.write("\n")
        elif url:
            print(f"clients use: {url}")
        return 0
    except (cloud.CloudError, DigitalOceanError, DataError) as e:
        print(f"gpufleet cloud: {e}", file=sys.stderr)
        return 1


def plan_json(the_plan: CloudPlan, url: str | None, applied: bool) -> dict[str, Any]:
    return {
        "tag": the_plan.tag, "region": the_plan.region, "applied": applied, "url": url,
        "droplets": [d.name for d in the_plan.droplets],
        "tag_added_to": [d.name for d in the_plan.to_tag],
        "resources": [{"kind": r.kind, "name": r.name, "id": r.id, "action": r.action,
                       "changes": [c.describe() for c in r.changes]}
                      for r in the_plan.resources],
    }
