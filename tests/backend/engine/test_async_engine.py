"""The asyncio front: concurrent streams, cancellation, queue limit, step off the event loop.

Every test runs with the step loop on a thread and in a process of its own."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.backend.config import EngineConfig
from pagedserve.backend.engine.client import EngineClient
from pagedserve.backend.engine.request import FinishReason, RequestOutputDelta
from pagedserve.backend.errors import QueueFullError


LOOP_PLACES = ["thread", "process"]


@pytest.fixture(scope="module", params=LOOP_PLACES)
def engine_process(request) -> bool:
    return request.param == "process"


@pytest.fixture(scope="module")
def engine(tiny_llama_dir, engine_process):
    config = EngineConfig.from_kwargs(
        model=str(tiny_llama_dir), device="cpu", num_blocks=96, max_queued_requests=64
    )
    eng = EngineClient.from_config(config, engine_process=engine_process)
    yield eng
    eng.shutdown()


async def wait_all_free(engine: EngineClient, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        load = engine.get_load()
        if load.num_free_blocks == load.num_total_blocks and load.num_running == load.num_waiting == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"blocks not freed: {engine.get_load()}")


async def collect(engine: EngineClient, prompt: str, params: SamplingParams):
    deltas = [d async for d in engine.generate(prompt=prompt, params=params)]
    return deltas


async def test_concurrent_streams_equal_offline_output(engine, tiny_llama_dir) -> None:
    prompts = [f"Request number {i} says" + " word" * i for i in range(12)]
    params = SamplingParams(max_tokens=10, temperature=0.0)
    results = await asyncio.gather(*(collect(engine, p, params) for p in prompts))
    offline = LLM(str(tiny_llama_dir), device="cpu").generate(prompts, params)
    for deltas, ref in zip(results, offline):
        assert deltas[-1].finished and deltas[-1].finish_reason is FinishReason.LENGTH
        assert [t for d in deltas for t in d.token_ids] == ref.token_ids
        assert "".join(d.text for d in deltas) == ref.text
        assert deltas[-1].usage.completion_tokens == 10
    await wait_all_free(engine)


async def test_a_slow_reader_gets_every_step_it_missed_in_one_delta(engine, tiny_llama_dir) -> None:
    """Deltas that wait for their reader merge: the stream stays complete and exact, with
    fewer, larger messages rather than a backlog."""
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=2)
    stream = engine.generate(prompt="The slow reader", params=params)
    first = await anext(stream)
    await wait_all_free(engine)  # the request finishes while nobody reads
    rest = [d async for d in stream]
    assert len(rest) == 1 and rest[0].finished and rest[0].finish_reason is FinishReason.LENGTH
    assert rest[0].usage.completion_tokens == 40 and rest[0].times.first_token is not None
    deltas = [first, *rest]
    ref = LLM(str(tiny_llama_dir), device="cpu").generate(["The slow reader"], params)[0]
    assert [t for d in deltas for t in d.token_ids] == ref.token_ids
    assert "".join(d.text for d in deltas) == ref.text
    assert [lp.token_id for d in deltas for lp in d.logprobs] == ref.token_ids
    assert all(len(lp.top) == 2 for d in deltas for lp in d.logprobs)


# Long enough that a request left running after its stream closes cannot pass for an aborted
# one: prompt + 1000 tokens fit the tiny model's 1024 positions and the 96 x 16-token cache.
LONG_MAX_TOKENS = 1000
# Waits for the final delta of a request that should have been aborted. Only a broken abort
# makes it long: then the request runs all its tokens, or this expires; either fails the test.
FINAL_DELTA_TIMEOUT_S = 120.0


class FinalDeltas:
    """The final delta of every request the engine ends, as its output listener sees them:
    also those of requests whose stream was closed, which no stream receives."""

    def __init__(self, engine: EngineClient) -> None:
        self._finals: dict[str, RequestOutputDelta] = {}
        self._lock = threading.Lock()  # the listener runs on the thread that delivers
        engine.add_output_listener(self._on_deltas)

    def _on_deltas(self, deltas: list[RequestOutputDelta]) -> None:
        with self._lock:
            for delta in deltas:
                if delta.finished:
                    self._finals[delta.request_id] = delta

    async def wait(
        self, request_id: str, timeout: float = FINAL_DELTA_TIMEOUT_S
    ) -> RequestOutputDelta:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                final = self._finals.get(request_id)
            if final is not None:
                return final
            await asyncio.sleep(0.01)
        raise AssertionError(f"request {request_id} did not end within {timeout}s")


@pytest.fixture(scope="module")
def final_deltas(engine) -> FinalDeltas:
    return FinalDeltas(engine)


def assert_aborted_early(final: RequestOutputDelta, params: SamplingParams) -> None:
    """Ended by an abort, a few steps after its stream closed: nowhere near max_tokens (a
    request the engine was never told to abort ends with LENGTH after all of them)."""
    assert final.finish_reason is FinishReason.ABORT, (final.finish_reason, final.usage)
    assert final.usage is not None
    assert final.usage.completion_tokens < params.max_tokens // 2, final.usage


async def test_cancel_mid_stream_aborts_and_frees_blocks(engine, final_deltas) -> None:
    params = SamplingParams(max_tokens=LONG_MAX_TOKENS, ignore_eos=True)
    stream = engine.generate(prompt="a long story", params=params, request_id="closed-stream")
    got = 0
    async for _ in stream:
        got += 1
        if got == 3:
            break
    await stream.aclose()
    assert_aborted_early(await final_deltas.wait("closed-stream"), params)
    await wait_all_free(engine)


async def test_task_cancellation_aborts(engine, final_deltas) -> None:
    params = SamplingParams(max_tokens=LONG_MAX_TOKENS, ignore_eos=True)
    streaming = asyncio.Event()

    async def consume():
        got = 0
        async for _ in engine.generate(prompt="x", params=params, request_id="cancelled-task"):
            got += 1
            if got == 3:
                streaming.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(streaming.wait(), timeout=60.0)  # cancelled mid-stream
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_aborted_early(await final_deltas.wait("cancelled-task"), params)
    await wait_all_free(engine)


async def test_queue_limit_raises_queue_full(tiny_llama_dir, engine_process) -> None:
    config = EngineConfig.from_kwargs(
        model=str(tiny_llama_dir), device="cpu", max_queued_requests=2, max_num_seqs=1
    )
    eng = EngineClient.from_config(config, engine_process=engine_process)
    try:
        params = SamplingParams(max_tokens=200, ignore_eos=True)
        streams = []
        with pytest.raises(QueueFullError):
            for _ in range(10):
                streams.append(eng.generate(prompt="hello", params=params))
        assert len(streams) >= 2
        for s in streams:
            await s.aclose()
        await wait_all_free(eng)
    finally:
        eng.shutdown()


async def test_event_loop_stays_responsive_during_steps(engine) -> None:
    """While the engine works, the loop still runs short callbacks promptly."""
    task = asyncio.create_task(collect(engine, "busy " * 50, SamplingParams(max_tokens=60, ignore_eos=True)))
    worst = 0.0
    while not task.done():
        t0 = time.perf_counter()
        await asyncio.sleep(0.005)
        worst = max(worst, time.perf_counter() - t0)
    await task
    assert worst < 0.5, f"event loop stalled for {worst:.3f}s"


async def test_stream_interval_sends_the_first_token_at_once_then_groups(
    tiny_llama_dir, engine_process
) -> None:
    """With stream_interval 4 the first delta still carries the first token alone (time to
    first token unchanged), every later one but the last at least 4 tokens."""
    config = EngineConfig.from_kwargs(model=str(tiny_llama_dir), device="cpu", num_blocks=96)
    eng = EngineClient.from_config(config, stream_interval=4, engine_process=engine_process)
    first_taken = threading.Event()
    steps = 0

    def hold_second_step(_info) -> None:
        # Runs before a step's deltas go out (on the engine thread, or on the thread that
        # reads them from the engine process): the second token cannot reach the mailbox
        # before the test has taken the first.
        nonlocal steps
        steps += 1
        if steps == 2:
            first_taken.wait(10.0)

    eng.add_step_listener(hold_second_step)
    params = SamplingParams(max_tokens=18, temperature=0.0, ignore_eos=True)
    try:
        stream = eng.generate(prompt="Grouped tokens", params=params)
        deltas = [await anext(stream)]
        first_taken.set()
        deltas += [d async for d in stream]
    finally:
        first_taken.set()
        eng.shutdown()
    sizes = [len(d.token_ids) for d in deltas]
    assert sizes[0] == 1 and all(n >= 4 for n in sizes[1:-1]) and sum(sizes) == 18, sizes
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    ref = LLM(str(tiny_llama_dir), device="cpu").generate(["Grouped tokens"], params)[0]
    assert [t for d in deltas for t in d.token_ids] == ref.token_ids
    assert "".join(d.text for d in deltas) == ref.text


def test_stream_interval_below_one_is_refused_before_loading(tmp_path) -> None:
    # A model path that does not exist: a load would fail with ModelLoadError instead.
    config = EngineConfig.from_kwargs(model=str(tmp_path / "missing"), device="cpu")
    with pytest.raises(ValueError, match="stream_interval"):
        EngineClient.from_config(config, stream_interval=0)
