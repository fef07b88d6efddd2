"""The ``gpufleet-lab`` command: local GPU droplets and cloud emulators for trying gpufleet."""

from __future__ import annotations

import argparse
import sys

from gpufleet_lab import manager
from gpufleet_lab.hosts import LabError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpufleet-lab", description=__doc__)
    manager.configure(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LabError as e:  # one line, no traceback
        print(f"gpufleet-lab: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
