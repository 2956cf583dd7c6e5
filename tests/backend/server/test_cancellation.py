"""A client cancel or an expired deadline aborts the request in the engine and frees its blocks."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from pagedserve.backend.server.server import BackgroundServer
from pagedserve.clients.client import AsyncGenerationClient, GenerationClient
from tests.backend.server.harness import SlowSteps, all_blocks_free, wait_for

LONG = dict(max_tokens=500, ignore_eos=True)
# Several engine steps of slack: the abort must land within one step, the rest is polling.
FREE_TIMEOUT_S = 2.0


def _engine_requests(server: BackgroundServer) -> int:
    engine = server.state.engine
    assert engine is not None
    return len(engine.engine.requests)


def test_cancel_mid_stream_frees_every_block(
    client: GenerationClient, tiny_server: BackgroundServer, slow_steps: SlowSteps
) -> None:
    with slow_steps.on():
        call = client.generate("Tell me a long story", request_id="to-cancel", **LONG)
        stream = iter(call)
        received = [next(stream) for _ in range(3)]
        assert all(r.finish_reason == 0 for r in received)
        load = client.load()
        assert load.num_running == 1 and load.num_free_blocks < load.num_total_blocks
        cancelled_at = time.time()
        call.cancel()
        wait_for(lambda: all_blocks_free(client), FREE_TIMEOUT_S, "blocks after cancel")
    assert _engine_requests(tiny_server) == 0
    assert slow_steps.steps_running("to-cancel", after=0.0) >= 3  # the record sees the request
    # Within one step: at most the step that was starting while the cancel was on the wire.
    assert slow_steps.steps_running("to-cancel", cancelled_at) <= 1
    with pytest.raises(grpc.RpcError) as info:
        next(stream)
    assert info.value.code() == grpc.StatusCode.CANCELLED


def test_deadline_gives_deadline_exceeded_and_frees_blocks(
    client: GenerationClient, tiny_server: BackgroundServer, slow_steps: SlowSteps
) -> None:
    with slow_steps.on():
        with pytest.raises(grpc.RpcError) as info:
            list(client.generate("Tell me a long story", timeout=0.5, **LONG))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: all_blocks_free(client), FREE_TIMEOUT_S, "blocks after the deadline")
        with pytest.raises(grpc.RpcError) as info:
            client.complete("Another long one", timeout=0.5, **LONG)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: all_blocks_free(client), FREE_TIMEOUT_S, "blocks after the deadline")
    assert _engine_requests(tiny_server) == 0


async def test_async_cancel_of_many_streams_frees_every_block(
    tiny_server: BackgroundServer, slow_steps: SlowSteps
) -> None:
    with slow_steps.on():
        async with AsyncGenerationClient(tiny_server.address) as client:
            calls = [client.generate(f"story {i}", **LONG) for i in range(8)]
            for call in calls:
                await call.read()  # every request is running
            load = await client.load()
            assert load.num_running == 8
            for call in calls:
                call.cancel()
            deadline = asyncio.get_running_loop().time() + FREE_TIMEOUT_S
            while True:
                load = await client.load()
                if load.num_free_blocks == load.num_total_blocks and load.num_running == 0:
                    break
                assert asyncio.get_running_loop().time() < deadline, load
                await asyncio.sleep(0.02)
    assert _engine_requests(tiny_server) == 0
