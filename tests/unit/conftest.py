"""Fixtures shared by the unit tests."""

from gpufleet_lab.testing import hub_servers, vllm_python  # noqa: F401 (fixtures)
