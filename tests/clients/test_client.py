"""The sync and asyncio clients: request building, streaming, and no torch on import."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2

from pagedserve.backend.server.server import BackgroundServer
from pagedserve.clients.client import AsyncGenerationClient, GenerationClient, build_request


def test_build_request_sets_only_given_fields() -> None:
    request = build_request("Hi", max_tokens=5, temperature=0.0, stop=["\n"], seed=None)
    assert request.prompt == "Hi"
    assert request.HasField("temperature") and request.temperature == 0.0
    assert request.max_tokens == 5 and list(request.stop) == ["\n"]
    for unset in ("top_p", "top_k", "seed", "min_tokens", "ignore_eos", "logprobs"):
        assert not request.HasField(unset), unset


def test_build_request_inputs() -> None:
    assert list(build_request(prompt_token_ids=[1, 2, 3]).prompt_token_ids.ids) == [1, 2, 3]
    chat = build_request(messages=[{"role": "user", "content": "a"}, ("assistant", "b")])
    roles = [(m.role, m.content) for m in chat.messages.messages]
    assert roles == [("user", "a"), ("assistant", "b")]
    # An explicitly empty input is still that input (the server then names it as invalid).
    assert build_request(prompt_token_ids=[]).WhichOneof("input") == "prompt_token_ids"
    with pytest.raises(ValueError):
        build_request()
    with pytest.raises(ValueError):
        build_request("a", prompt_token_ids=[1])
    with pytest.raises(TypeError, match="max_new_tokens"):
        build_request("a", max_new_tokens=3)


def test_client_modules_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import pagedserve.clients.client, pagedserve.clients.cli, pagedserve.clients.loadgen\n"
        "import pagedserve.v1.generation_pb2_grpc\n"
        "heavy = ('torch', 'transformers', 'pagedserve.backend.engine')\n"
        "loaded = [m for m in heavy if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sync_client_streams_and_completes(tiny_server: BackgroundServer) -> None:
    with GenerationClient(tiny_server.address) as client:
        client.wait_until_serving(10)
        assert client.health() == health_pb2.HealthCheckResponse.SERVING
        pieces = list(client.generate_text("Hello", max_tokens=10, temperature=0.0))
        whole = client.complete("Hello", max_tokens=10, temperature=0.0)
        assert len(pieces) > 1 and "".join(pieces) == whole.text
        call = client.generate("Hello", max_tokens=10, temperature=0.0)
        responses = list(call)
        assert call.code() == grpc.StatusCode.OK
        assert responses[-1].usage.completion_tokens == 10


async def test_async_client_matches_sync(tiny_server: BackgroundServer) -> None:
    with GenerationClient(tiny_server.address) as sync_client:
        expected = sync_client.complete("Async hello", max_tokens=9, temperature=0.0)
    async with AsyncGenerationClient(tiny_server.address) as client:
        await client.wait_until_serving(10)
        text = client.generate_text("Async hello", max_tokens=9, temperature=0.0)
        pieces = [p async for p in text]
        assert "".join(pieces) == expected.text
        whole = await client.complete("Async hello", max_tokens=9, temperature=0.0)
        assert list(whole.token_ids) == list(expected.token_ids)
        with GenerationClient(tiny_server.address) as sync_client:
            assert await client.tokenize("Async hello") == sync_client.tokenize("Async hello")
        info = await client.model_info()
        assert info.vocab_size > 0
        load = await client.load()
        assert load.num_total_blocks > 0
        assert await client.health() == health_pb2.HealthCheckResponse.SERVING


def test_wait_until_serving_times_out_without_a_server() -> None:
    with GenerationClient("127.0.0.1:1") as client:
        with pytest.raises(TimeoutError):
            client.wait_until_serving(0.3)

