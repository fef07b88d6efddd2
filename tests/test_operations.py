"""Operation tests in pyinfra's fixture style: tests/operations/<module>.<op>/*.yaml."""

from pathlib import Path

from pyinfra_testing.operations import make_operation_tests

BASE = Path(__file__).parent / "operations"
for _name in sorted(d.name for d in BASE.iterdir() if d.is_dir()):
    locals()[_name] = make_operation_tests("gpufleet.operations", _name, BASE / _name)
