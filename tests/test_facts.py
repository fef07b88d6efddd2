"""Fact tests in pyinfra's fixture style: tests/facts/<module>.<Fact>/*.yaml."""

from pathlib import Path

from pyinfra_testing.facts import make_fact_tests

BASE = Path(__file__).parent / "facts"
for _name in sorted(d.name for d in BASE.iterdir() if d.is_dir()):
    locals()[_name] = make_fact_tests("gpufleet.facts", _name, BASE / _name)
