#!/usr/bin/env python3
"""Print README.md's spec table from gpufleet.model.spec_fields; ``--write`` puts it into
README.md between the ``<!-- spec-table -->`` markers."""

from __future__ import annotations

import sys
from pathlib import Path

from gpufleet.model.spec_fields import markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- spec-table -->", "<!-- /spec-table -->"


def table_in(text: str) -> str:
    """The text between the markers of ``text``."""
    start = text.index(BEGIN) + len(BEGIN) + 1
    return text[start:text.index(END, start)]


def with_table(text: str, table: str) -> str:
    start = text.index(BEGIN) + len(BEGIN) + 1
    return text[:start] + table + text[text.index(END, start):]


def main(argv: list[str]) -> int:
    table = markdown_table()
    if argv == ["--write"]:
        README.write_text(with_table(README.read_text(encoding="utf-8"), table), encoding="utf-8")
    else:
        sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
