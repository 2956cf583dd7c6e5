"""The OpenAI-compatible API of the server package's tiny-model server, driven by the real
``openai`` client over loopback (the same server answers gRPC, for comparisons)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from pagedserve.backend.server.server import BackgroundServer

# A call to the tiny model on loopback takes well under a second; this bounds a hung one.
CALL_TIMEOUT_S = 60.0


def base_url(server: BackgroundServer, scheme: str = "http") -> str:
    return f"{scheme}://{server.http_address}/v1"


def openai_client(server: BackgroundServer, **options: Any) -> openai.OpenAI:
    """No retries: a test sees the server's first answer."""
    options.setdefault("api_key", "unused")
    return openai.OpenAI(
        base_url=base_url(server), max_retries=0, timeout=CALL_TIMEOUT_S, **options
    )


@pytest.fixture(scope="session")
def model(tiny_server: BackgroundServer) -> str:
    return tiny_server.state.served_model_name


@pytest.fixture(scope="session")
def tokenizer(tiny_server: BackgroundServer) -> Any:
    engine = tiny_server.state.engine
    assert engine is not None
    return engine.tokenizer


@pytest.fixture
def oai(tiny_server: BackgroundServer) -> Iterator[openai.OpenAI]:
    with openai_client(tiny_server) as client:
        yield client
