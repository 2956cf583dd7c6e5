"""End to end on the default model: a chat question over gRPC gets the right answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagedserve.clients.client import GenerationClient
from tests.backend.server.harness import running_server

pytestmark = pytest.mark.slow


def test_capital_of_france_over_grpc(default_model_dir: Path) -> None:
    with running_server(default_model_dir, num_blocks=64) as server:
        with GenerationClient(server.address) as client:
            assert client.model_info().model_name == "SmolLM2-135M-Instruct"
            messages = [{"role": "user", "content": "What is the capital of France?"}]
            pieces = list(client.generate_text(messages=messages, max_tokens=32, temperature=0.0))
    answer = "".join(pieces)
    assert len(pieces) > 1, "the answer should arrive as a stream"
    assert "Paris" in answer, answer
