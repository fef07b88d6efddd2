"""README.md's spec table is the one spec_fields renders, and the dataclass agrees with it."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from gpufleet.model import spec
from gpufleet.model.spec_fields import SPEC_FIELDS, markdown_table

ROOT = Path(__file__).resolve().parents[2]


def _script():
    path = ROOT / "scripts" / "readme_spec_table.py"
    module_spec = importlib.util.spec_from_file_location("readme_spec_table", path)
    assert module_spec and module_spec.loader
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_readme_spec_table_is_the_rendered_table():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert _script().table_in(readme) == markdown_table(), (
        "README.md's spec table differs from spec_fields: run "
        "'.venv/bin/python scripts/readme_spec_table.py --write'")


def test_every_spec_key_has_a_row():
    table = markdown_table()
    for key in spec.SPEC_KEYS:
        assert f"| `{key}` |" in table, key


def test_dataclass_defaults_are_the_tables():
    fields = {f.name: f for f in dataclasses.fields(spec.ServiceSpec)}
    assert list(fields) == [f.name for f in SPEC_FIELDS]
    for row in SPEC_FIELDS:
        field = fields[row.name]
        if row.required:
            assert field.default is dataclasses.MISSING, row.name
        else:
            assert field.default == row.default, row.name


def test_the_types_drive_validation():
    base = {"service": "a", "model": "o/m", "image": "i:1"}
    given = spec.build_spec({**base, "port": "8002", "gpu_memory_utilization": "0.5",
                             "enable_prefix_caching": "no", "max_num_seqs": None})
    assert (given.port, given.gpu_memory_utilization, given.enable_prefix_caching,
            given.max_num_seqs) == (8002, 0.5, False, None)
