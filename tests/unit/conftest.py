"""Fixtures shared by the unit tests."""

from gpufleet_lab.testing import hub_servers  # noqa: F401 (a fixture)
