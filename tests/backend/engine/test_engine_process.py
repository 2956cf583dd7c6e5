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
import time
from pathlib import Path

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.backend.config import EngineConfig
from pagedserve.backend.engine.client import EngineClient
from pagedserve.backend.engine.core import EngineCore
from pagedserve.backend.engine.messages import (
    WIRE_VERSION,
    AbortRequest,
    Shutdown,
    StepOutputs,
    decode,
    encode,
)
from pagedserve.backend.engine.request import FinishReason, RequestOutputDelta
from pagedserve.backend.errors import (
    EngineDeadError,
    InvalidRequestError,
    ModelLoadError,
    RequestTooLongError,
)
from tests.backend.runner.tp_harness import assert_gone

EXIT_TIMEOUT_S = 30.0


def _config(model_dir: Path, **kwargs) -> EngineConfig:
    return EngineConfig.from_kwargs(model=str(model_dir), device="cpu", **{"num_blocks": 32, **kwargs})


@pytest.fixture
def process_engine(tiny_llama_dir):
    eng = EngineClient.from_config(_config(tiny_llama_dir), engine_process=True)
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


def test_step_outputs_cross_the_socket_unchanged(tiny_llama_dir) -> None:
    """Mid-stream deltas travel in columns: every delta of real generations (stop strings,
    logprobs, length and stop finishes, a preemption) comes back equal, in order."""
    core = EngineCore(_config(tiny_llama_dir, num_blocks=6, max_num_seqs=4))
    for i, params in enumerate([
        SamplingParams(max_tokens=30, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=0.8, seed=3, stop=[" the", "."]),
        SamplingParams(max_tokens=12, logprobs=2, ignore_eos=True),
        SamplingParams(max_tokens=40, ignore_eos=True),
    ]):
        core.add(core.builder.build(prompt=f"Request {i} goes" * 3, params=params))
    steps: list[StepOutputs] = []
    while core.has_unfinished():
        steps.append(StepOutputs(core.step(), core.last_step, core.get_load()))
    assert core.scheduler.num_preemptions > 0  # 6 blocks cannot hold all four
    deltas = [d for s in steps for d in s.deltas]
    assert sum(d.finished for d in deltas) == 4
    assert sum(d.logprobs is None and not d.finished for d in deltas) > len(deltas) // 2
    assert [decode(encode(s)) for s in steps] == steps


def test_a_frame_of_another_wire_version_is_refused() -> None:
    frame = pickle.dumps((WIRE_VERSION + 1, Shutdown()))
    with pytest.raises(ValueError, match="wire version"):
        decode(frame)
    assert decode(encode(AbortRequest("r"))) == AbortRequest("r")


@pytest.mark.parametrize("in_process", [True, False], ids=["engine thread", "engine process"])
async def test_a_closed_streams_id_is_in_use_until_its_abort_lands(tiny_llama_dir, in_process) -> None:
    """A stream closed early keeps its id until the core's final (abort) delta arrives, so a
    request that reuses the id never receives the old request's last deltas."""
    eng = EngineClient.from_config(_config(tiny_llama_dir), engine_process=not in_process)
    finals: list[RequestOutputDelta] = []
    eng.add_output_listener(lambda deltas: finals.extend(d for d in deltas if d.finished))
    try:
        params = SamplingParams(max_tokens=200, ignore_eos=True)
        first = eng.generate(prompt="one", params=params, request_id="same")
        await anext(first)
        await first.aclose()
        short = SamplingParams(max_tokens=4, ignore_eos=True)
        try:
            second = eng.generate(prompt="two", params=short, request_id="same")
        except InvalidRequestError as error:  # the abort has not landed yet: it is still in use
            assert "already in use" in str(error)
            deadline = time.monotonic() + 10
            while not finals and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            second = eng.generate(prompt="two", params=short, request_id="same")
        deltas = [d async for d in second]
        assert sum(len(d.token_ids) for d in deltas) == 4
        assert deltas[-1].finish_reason is FinishReason.LENGTH
        assert [d.finish_reason for d in finals] == [FinishReason.ABORT, FinishReason.LENGTH]
        assert eng.is_alive
    finally:
        eng.shutdown()


async def test_a_killed_engine_process_fails_streams_at_once(tiny_llama_dir) -> None:
    eng = EngineClient.from_config(_config(tiny_llama_dir), engine_process=True)
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
    eng = EngineClient.from_config(_config(tiny_llama_dir), engine_process=True)
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
        EngineClient.from_config(_config(tmp_path / "no-such-model"), engine_process=True)


_ORPHAN_SCRIPT = """
import asyncio, os, sys
from pagedserve.backend.config import EngineConfig
from pagedserve.backend.engine.client import EngineClient
from pagedserve.backend.sampling_params import SamplingParams

async def main():
    config = EngineConfig.from_kwargs(model=sys.argv[1], device="cpu", num_blocks=32)
    eng = EngineClient.from_config(config, engine_process=True)
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
