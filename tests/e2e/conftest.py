"""One lab per test run, shared by test_deploy.py, test_preflight.py and test_real_engine.py
(booting is the expensive part), and the state those tests start from: the plain deploy has run
(``deployed``). Its three good hosts serve with the REAL vLLM (upstream vLLM on CPU)."""

from __future__ import annotations

import pytest

from tests.e2e.lab import Converged, Lab, converge, lab_available, start_lab

# host 1..6: what a mixed fleet looks like
PROFILES = ["h100", "rtx4000ada", "h100:base", "nodriver", "nogpu", "t4"]
GOOD = ["llama3-gpu-01", "llama3-gpu-02", "llama3-gpu-03"]
API = "gf-GPUFLEETLABSECRETapikey0123456789abcdef"


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

    the_lab: Lab = start_lab("ge", "10.215.0", PROFILES, engine="real")
    try:
        yield the_lab
    finally:
        manager.down(the_lab.cfg)


@pytest.fixture(scope="session")
def secrets(lab: Lab) -> dict[str, str]:
    """Every deploy's secrets: the lab's own Hub token (a random 'hf_lab<40 hex>' the Hub
    emulator accepts) and a fixed API key. The same secrets each run: no changes."""
    return {"HF_TOKEN": lab.env["HF_TOKEN"], "VLLM_API_KEY": API}


@pytest.fixture(scope="session")
def first_deploy(lab: Lab, secrets: dict[str, str]) -> Converged:
    """The first deploy on the fresh lab, over every host at -vv with --diff (the good hosts
    converge, the others fail on purpose), and how it left the good hosts."""
    return converge(lab, GOOD, "-vv", "--diff", extra_env=secrets)


@pytest.fixture
def deployed(first_deploy: Converged) -> Converged:
    """The good hosts as the first deploy left them (redeployed if a test changed them)."""
    first_deploy.restore(GOOD)
    return first_deploy
