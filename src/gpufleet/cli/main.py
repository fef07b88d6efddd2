"""The ``gpufleet`` command: check and plan a spec, roll it out, list releases."""

from __future__ import annotations

# gevent's monkey-patching first, before pyinfra and paramiko are imported, as pyinfra's own CLI
# does: a rollout's hosts run in greenlets, which wait for each other on unpatched sockets
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from pyinfra.api.exceptions import PyinfraError  # noqa: E402

from gpufleet.cli.data import parse_data  # noqa: E402
from gpufleet.model import secrets  # noqa: E402
from gpufleet.model.spec import SPEC_KEYS, check_data_keys, load_spec  # noqa: E402


def cmd_check(args: argparse.Namespace) -> int:
    data = parse_data(args.data)
    check_data_keys(data)  # the deploy refuses the same keys
    overrides = {k: v for k, v in data.items() if k in SPEC_KEYS and v is not None}
    spec = load_spec(args.spec, overrides=overrides, environ=os.environ)
    if args.json:
        print(json.dumps({"spec": spec.as_dict(), "vllm_args": spec.vllm_args(spec.gpu_count)},
                         indent=2))
        return 0
    print(f"{args.spec}: ok")
    width = max(len(k) for k in spec.as_dict())
    for key, value in spec.as_dict().items():
        print(f"  {key:<{width}}  {value}")
    print("  vllm serve " + shlex.join(spec.vllm_args(spec.gpu_count)))
    return 0


def cmd_api_key(args: argparse.Namespace) -> int:
    path = secrets.api_key_path(args.service, os.environ)
    if os.environ.get("VLLM_API_KEY"):
        print("VLLM_API_KEY is set in the environment; gpufleet deploys that key.")
        return 0
    if not path.exists():
        print(f"no API key generated yet for {args.service!r} (it is made by the first deploy, "
              f"at {path})", file=sys.stderr)
        return 1
    print(path.read_text().strip() if args.show else path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpufleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="validate a service spec and show the vLLM command")
    check.add_argument("spec", type=Path, nargs="?", default=Path("deploys/llama3.yaml"))
    check.add_argument("--data", action="append", default=[], metavar="KEY=VALUE",
                       help="override a spec key, as pyinfra --data does")
    check.add_argument("--json", action="store_true")
    check.set_defaults(func=cmd_check)

    key = sub.add_parser("api-key", help="where the generated vLLM API key of a service is kept")
    key.add_argument("service")
    key.add_argument("--show", action="store_true", help="print the key itself")
    key.set_defaults(func=cmd_api_key)

    from gpufleet.cli import bench as bench_cli
    from gpufleet.cli import cloud as cloud_cli
    from gpufleet.cli import fleet as rollout_cli
    from gpufleet.cli import plan as plan_cli
    from gpufleet.cli import recovery as recovery_cli
    from gpufleet.cli import status as status_cli

    plan_cli.add_parser(sub)
    rollout_cli.add_parser(sub)
    recovery_cli.add_parser(sub)
    status_cli.add_parser(sub)
    bench_cli.add_parser(sub)
    cloud_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except PyinfraError as e:
        print(f"gpufleet: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
