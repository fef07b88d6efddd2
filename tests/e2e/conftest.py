"""One lab per test run, shared by every end-to-end test (booting is the expensive part)."""

from __future__ import annotations

import pytest

from tests.e2e.lab import Lab, lab_available, start_lab

# host 1..6: what a mixed fleet looks like
PROFILES = ["h100", "rtx4000ada", "h100:base", "nodriver", "nogpu", "t4"]
GOOD = ["llama3-gpu-01", "llama3-gpu-02", "llama3-gpu-03"]


def pytest_collection_modifyitems(config, items):
    why = lab_available()
    for item in items:
        if "tests/e2e/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.lab)
            if why:
                item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="session")
def lab():
    from gpufleet_lab import manager

    the_lab: Lab = start_lab("ge", "10.215.0", PROFILES)
    try:
        yield the_lab
    finally:
        manager.down(the_lab.cfg)
