"""One tiny-model server for the whole server test package (loading is the slow part)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pagedserve.backend.server.server import BackgroundServer
from pagedserve.clients.client import GenerationClient
from tests.backend.server.harness import TINY_ENGINE, SlowSteps, running_server

# Long enough that a request is still running when the test cancels it.
SLOW_STEP_S = 0.02


@pytest.fixture(scope="session")
def tiny_server(tiny_llama_dir: Path) -> Iterator[BackgroundServer]:
    with running_server(tiny_llama_dir, **TINY_ENGINE) as server:
        yield server


@pytest.fixture(scope="session")
def slow_steps(tiny_server: BackgroundServer) -> SlowSteps:
    return SlowSteps(tiny_server, SLOW_STEP_S)


@pytest.fixture
def client(tiny_server: BackgroundServer) -> Iterator[GenerationClient]:
    with GenerationClient(tiny_server.address) as c:
        yield c
