"""Bytes and compute capabilities as the planner writes them in its messages."""

from __future__ import annotations

MiB = 1 << 20
GiB = 1 << 30


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def mib(n: float) -> str:
    return f"{n / MiB:,.0f} MiB"


def cc_text(cc: tuple[int, int]) -> str:
    """``(8, 9)`` as nvidia-smi prints it: ``8.9``."""
    return f"{cc[0]}.{cc[1]}"
