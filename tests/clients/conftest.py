"""A tiny-model server for the client tests (a real one, on a loopback ephemeral port)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pagedserve.backend.server.server import BackgroundServer
from tests.backend.server.harness import TINY_ENGINE, running_server


@pytest.fixture(scope="session")
def tiny_server(tiny_llama_dir: Path) -> Iterator[BackgroundServer]:
    with running_server(tiny_llama_dir, **TINY_ENGINE) as server:
        yield server
