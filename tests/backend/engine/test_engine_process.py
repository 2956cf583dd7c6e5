"""The engine loop in a process of its own: what only a second process can get wrong.

The shared behaviour (streams, cancellation, queue limit, stream interval) runs in both places
in ``test_async_engine.py``; here are validation before anything crosses the pipe, errors that
must survive pickling, and the death of either process.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.backend.config import EngineConfig
from pagedserve.backend.engine.async_engine import AsyncEngine
from pagedserve.backend.engine.engine import LLMEngine, LoadInfo, StepInfo
from pagedserve.backend.engine.engine_loop import EngineLoop
from pagedserve.backend.engine.engine_process import _decode, _encode
from pagedserve.backend.engine.request import FinishReason, RequestOutputDelta
from pagedserve.backend.errors import (
    EngineDeadError,
    InvalidRequestError,
    ModelLoadError,
    PagedServeError,
    RequestTooLongError,
)
from tests.backend.runner.tp_harness import assert_gone

EXIT_TIMEOUT_S = 30.0


def _config(model_dir: Path, **kwargs) -> EngineConfig:
    return EngineConfig.from_kwargs(model=str(model_dir), device="cpu", **{"num_blocks": 32, **kwargs})


@pytest.fixture
def process_engine(tiny_llama_dir):
    eng = AsyncEngine.from_config(_config(tiny_llama_dir), engine_process=True)
    yield eng
    eng.shutdown()


def test_request_errors_survive_pickling() -> None:
    for error in (
        InvalidRequestError("max_tokens", "must be positive"),
        RequestTooLongError("prompt", "too long"),
        EngineDeadError("rank 1 exited"),
    ):
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error)
        assert getattr(copy, "field", None) == getattr(error, "field", None)


async def test_bad_requests_fail_in_the_server_process_and_the_engine_goes_on(
    process_engine, tiny_llama_dir
) -> None:
    vocab = process_engine.model_info.vocab_size
    with pytest.raises(InvalidRequestError, match="prompt_token_ids") as info:
        process_engine.generate(prompt_token_ids=[1, vocab], params=SamplingParams(max_tokens=2))
    assert info.value.field == "prompt_token_ids"
    with pytest.raises(RequestTooLongError, match="KV blocks"):
        # 32 blocks of 16 tokens hold 512; the model's context is longer.
        process_engine.generate(prompt="Hi", params=SamplingParams(max_tokens=600))
    with pytest.raises(InvalidRequestError, match="messages"):
        process_engine.render_chat([{"role": "robot", "content": "beep"}])
    stream = process_engine.generate(
        prompt="Still alive", params=SamplingParams(max_tokens=3), request_id="dup"
    )
    with pytest.raises(InvalidRequestError, match="already in use"):
        process_engine.generate(prompt="again", params=SamplingParams(max_tokens=3), request_id="dup")
    deltas = [d async for d in stream]
    params = SamplingParams(max_tokens=3)
    ref = LLM(str(tiny_llama_dir), device="cpu").generate(["Still alive"], params)[0]
    assert [t for d in deltas for t in d.token_ids] == ref.token_ids
    assert process_engine.tokenize("Still alive") == ref.prompt_token_ids


def test_deltas_cross_the_pipe_unchanged(tiny_llama_dir) -> None:
    """Mid-stream deltas travel as plain tuples: every delta of real generations (stop
    strings, logprobs, length and stop finishes, a preemption) comes back equal."""
    engine = LLMEngine(_config(tiny_llama_dir, num_blocks=6, max_num_seqs=4))
    for i, params in enumerate([
        SamplingParams(max_tokens=30, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=0.8, seed=3, stop=[" the", "."]),
        SamplingParams(max_tokens=12, logprobs=2, ignore_eos=True),
        SamplingParams(max_tokens=40, ignore_eos=True),
    ]):
        engine.add_request(engine.builder.build(prompt=f"Request {i} goes" * 3, params=params))
    deltas: list[RequestOutputDelta] = []
    while engine.has_unfinished():
        deltas += engine.step()
    assert engine.scheduler.num_preemptions > 0  # 6 blocks cannot hold all four
    assert sum(d.finished for d in deltas) == 4
    wire = pickle.loads(pickle.dumps([_encode(d) for d in deltas]))
    assert sum(type(w) is tuple for w in wire) > len(deltas) // 2
    assert [_decode(w) for w in wire] == deltas


class _RecordingSink:
    def __init__(self) -> None:
        self.deltas: list[RequestOutputDelta] = []
        self.rejected: list[tuple[str, PagedServeError]] = []
        self.failed: list[EngineDeadError] = []

    def deliver(self, deltas: list[RequestOutputDelta], step: StepInfo | None, load: LoadInfo, adds_taken: int) -> None:
        self.deltas += deltas

    def reject(self, request_id: str, error: PagedServeError) -> None:
        self.rejected.append((request_id, error))

    def fail(self, error: EngineDeadError) -> None:
        self.failed.append(error)


def test_the_loop_refuses_an_id_that_is_still_running(tiny_llama_dir) -> None:
    """Two fronts' checks can race (a stream closed, its abort not yet applied): the loop's
    own check keeps the running request and refuses the newcomer."""
    engine = LLMEngine(_config(tiny_llama_dir))
    loop = EngineLoop(engine)
    sink = _RecordingSink()
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    first = engine.builder.build(prompt="one", params=params, request_id="same")
    second = engine.builder.build(prompt="two", params=params, request_id="same")
    loop.add(first)
    loop.add(second)
    runner = threading.Thread(target=loop.run, args=(sink,))
    runner.start()
    deadline = time.monotonic() + 30
    while not any(d.finished for d in sink.deltas) and time.monotonic() < deadline:
        time.sleep(0.01)
    loop.stop()
    runner.join(30)
    assert [(rid, type(e)) for rid, e in sink.rejected] == [("same", InvalidRequestError)]
    assert sum(len(d.token_ids) for d in sink.deltas) == 4
    assert [str(e) for e in sink.failed] == ["the engine has shut down"]
    assert engine.get_load().num_free_blocks == engine.get_load().num_total_blocks


async def test_a_killed_engine_process_fails_streams_at_once(tiny_llama_dir) -> None:
    eng = AsyncEngine.from_config(_config(tiny_llama_dir), engine_process=True)
    try:
        pid = eng.engine_pid
        assert pid is not None and pid != os.getpid()
        stream = eng.generate(prompt="doomed", params=SamplingParams(max_tokens=400, ignore_eos=True))
        await anext(stream)
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(EngineDeadError, match=r"exited unexpectedly \(exit code -9\)"):
            async for _ in stream:
                pass
        assert time.monotonic() - killed < 5.0
        assert not eng.is_alive
        with pytest.raises(EngineDeadError, match="exited unexpectedly"):
            eng.generate(prompt="after", params=SamplingParams(max_tokens=2))
    finally:
        eng.shutdown()


async def test_shutdown_ends_running_streams_and_the_process(tiny_llama_dir) -> None:
    eng = AsyncEngine.from_config(_config(tiny_llama_dir), engine_process=True)
    pid = eng.engine_pid
    assert pid is not None
    stream = eng.generate(prompt="long", params=SamplingParams(max_tokens=400, ignore_eos=True))
    await anext(stream)
    await asyncio.to_thread(eng.shutdown)
    # The stream ends with its abort, as a client-visible final message, not an error.
    deltas = [d async for d in stream]
    assert deltas and deltas[-1].finished and deltas[-1].finish_reason is FinishReason.ABORT
    assert_gone([pid], EXIT_TIMEOUT_S)
    assert not eng.is_alive
    with pytest.raises(EngineDeadError, match="shut down"):
        eng.generate(prompt="after", params=SamplingParams(max_tokens=2))


def test_a_failed_load_raises_its_error_in_the_server_process(tmp_path) -> None:
    with pytest.raises(ModelLoadError):
        AsyncEngine.from_config(_config(tmp_path / "no-such-model"), engine_process=True)


_ORPHAN_SCRIPT = """
import asyncio, os, sys
from pagedserve.backend.config import EngineConfig
from pagedserve.backend.engine.async_engine import AsyncEngine
from pagedserve.backend.sampling_params import SamplingParams

async def main():
    config = EngineConfig.from_kwargs(model=sys.argv[1], device="cpu", num_blocks=32)
    eng = AsyncEngine.from_config(config, engine_process=True)
    stream = eng.generate(prompt="x", params=SamplingParams(max_tokens=400, ignore_eos=True))
    await anext(stream)
    print(eng.engine_pid, flush=True)
    os._exit(0)  # no shutdown: the way a killed server leaves

asyncio.run(main())
"""


def test_the_engine_process_exits_when_the_server_process_is_gone(tiny_llama_dir) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _ORPHAN_SCRIPT, str(tiny_llama_dir)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout.split()[-1])
    assert_gone([pid], EXIT_TIMEOUT_S)  # it outlived its server otherwise
