"""Graceful drain of a ``pagedserve serve`` process on SIGTERM/SIGINT, without a proxy.

The first signal: health NOT_SERVING at once (watches get it, then end), new RPCs UNAVAILABLE,
in-flight streams run to their end, exit 0. Streams still running at ``--drain-timeout`` end
with a final FINISH_REASON_ABORT message. A second signal exits at once with 128 + its number.
Engine steps are paused ``STEP_DELAY_S`` so streams are surely in flight when a signal lands.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from pagedserve.clients.client import GenerationClient
from pagedserve.v1 import generation_pb2 as pb
from tests.backend.server.serve_process import (
    NOT_SERVING,
    SERVING,
    HealthWatch,
    ServeProcess,
    StreamReader,
    serving,
)

STEP_DELAY_S = 0.02
# Bounds on every wait: generous for a loaded two-core machine, never unbounded.
CALL_TIMEOUT_S = 120.0
FIRST_MESSAGE_TIMEOUT_S = 60.0
HEALTH_TIMEOUT_S = 10.0
# Long enough to outlast any drain deadline here: at least 20 s at STEP_DELAY_S per token.
ENDLESS_TOKENS = 1000
SHORT_DRAIN_S = 1.5
GREEDY = {"ignore_eos": True, "temperature": 0.0}


@pytest.fixture
def drain_server(
    request: pytest.FixtureRequest, tiny_llama_dir: Path, tmp_path: Path
) -> Iterator[ServeProcess]:
    """A SERVING replica; ``@pytest.mark.parametrize("drain_server", [seconds], indirect=True)``
    sets its --drain-timeout."""
    with serving(
        [tiny_llama_dir], tmp_path, step_delay_s=STEP_DELAY_S, drain_timeout_s=request.param
    ) as (server,):
        yield server


def _assert_refused(client: GenerationClient) -> None:
    for call in (
        lambda: client.complete("New work", max_tokens=2, timeout=HEALTH_TIMEOUT_S),
        lambda: list(client.generate("New work", max_tokens=2, timeout=HEALTH_TIMEOUT_S)),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value


@pytest.mark.parametrize("drain_server", [60.0], indirect=True)
def test_sigterm_lets_three_streams_finish_refuses_new_calls_and_exits_0(
    drain_server: ServeProcess,
) -> None:
    server = drain_server
    max_tokens = 100
    prompts = [f"Stream number {i} tells a story about" for i in range(3)]
    with GenerationClient(server.address) as client:
        with ThreadPoolExecutor(len(prompts)) as pool:
            expected = list(
                pool.map(
                    lambda p: list(
                        client.complete(
                            p, max_tokens=max_tokens, timeout=CALL_TIMEOUT_S, **GREEDY
                        ).token_ids
                    ),
                    prompts,
                )
            )
        with HealthWatch(server.address) as watch:
            watch.wait_for(SERVING)
            streams = [
                StreamReader(
                    client.generate(p, max_tokens=max_tokens, timeout=CALL_TIMEOUT_S, **GREEDY)
                )
                for p in prompts
            ]
            for stream in streams:
                stream.wait_first_message(FIRST_MESSAGE_TIMEOUT_S)
            tokens_at_signal = [len(s.token_ids) for s in streams]
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)

            watch.wait_for(NOT_SERVING)
            # Having sent NOT_SERVING, the watch ends cleanly: it does not hold the drain open.
            assert watch.ended.wait(HEALTH_TIMEOUT_S) and watch.error is None
            assert watch.statuses == [SERVING, NOT_SERVING]
            # New calls are refused, on the busy channel and on a fresh one, while the process
            # is still draining.
            _assert_refused(client)
            with GenerationClient(server.address) as fresh:
                _assert_refused(fresh)
            assert server.running(), "the process left before its streams finished"
            unfinished = [s for s in streams if s.ended_at is None]
            assert unfinished, "every stream ended before the refusals were checked"

            for stream in streams:
                stream.join(CALL_TIMEOUT_S)
    exit_code = server.wait_exit(CALL_TIMEOUT_S)
    drained_in = time.monotonic() - signalled

    assert exit_code == 0, server.log_text()
    for stream, want, at_signal in zip(streams, expected, tokens_at_signal):
        assert stream.error is None, stream.error
        assert at_signal < max_tokens, "the stream was not in flight at the signal"
        assert stream.final.finish_reason == pb.FINISH_REASON_LENGTH
        assert stream.final.usage.completion_tokens == max_tokens
        assert stream.token_ids == want, "the drained stream's output differs"
        assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in stream.responses[:-1])
    # The process left once its work was done, not at the 60 s deadline.
    assert drained_in < 30.0, f"drain took {drained_in:.1f} s"


@pytest.mark.parametrize("drain_server", [SHORT_DRAIN_S], indirect=True)
def test_streams_running_at_the_drain_deadline_end_with_abort(
    drain_server: ServeProcess,
) -> None:
    server = drain_server
    with GenerationClient(server.address) as client:
        stream = StreamReader(
            client.generate("Never ending", max_tokens=ENDLESS_TOKENS, timeout=CALL_TIMEOUT_S,
                            **GREEDY)
        )
        with ThreadPoolExecutor(1) as pool:
            completion = pool.submit(
                client.complete, "Also never ending", max_tokens=ENDLESS_TOKENS,
                timeout=CALL_TIMEOUT_S, **GREEDY,
            )
            stream.wait_first_message(FIRST_MESSAGE_TIMEOUT_S)
            deadline = time.monotonic() + FIRST_MESSAGE_TIMEOUT_S
            while client.load().num_running < 2:
                assert time.monotonic() < deadline, "the Complete call never started running"
                time.sleep(STEP_DELAY_S)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGINT)
            stream.join(CALL_TIMEOUT_S)
            reply = completion.result(CALL_TIMEOUT_S)
    exit_code = server.wait_exit(CALL_TIMEOUT_S)

    # The stream ended on the deadline with a final message saying so, not in silence.
    assert stream.error is None, stream.error
    assert stream.ended_at is not None
    ended_after = stream.ended_at - signalled
    assert SHORT_DRAIN_S <= ended_after < SHORT_DRAIN_S + 10.0, ended_after
    final = stream.final
    assert final.finish_reason == pb.FINISH_REASON_ABORT
    generated = len(stream.token_ids)
    assert 0 < generated < ENDLESS_TOKENS
    assert final.usage.completion_tokens == generated
    assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in stream.responses[:-1])
    # Complete answers with what it had, marked aborted.
    assert reply.finish_reason == pb.FINISH_REASON_ABORT
    assert 0 < reply.usage.completion_tokens < ENDLESS_TOKENS
    assert len(reply.token_ids) == reply.usage.completion_tokens
    assert exit_code == 0, server.log_text()


@pytest.mark.parametrize("drain_server", [60.0], indirect=True)
def test_second_signal_exits_at_once(drain_server: ServeProcess) -> None:
    server = drain_server
    with GenerationClient(server.address) as client:
        with HealthWatch(server.address) as watch:
            watch.wait_for(SERVING)
            stream = StreamReader(
                client.generate("Cut short", max_tokens=ENDLESS_TOKENS, timeout=CALL_TIMEOUT_S,
                                **GREEDY)
            )
            stream.wait_first_message(FIRST_MESSAGE_TIMEOUT_S)
            server.process.send_signal(signal.SIGTERM)
            watch.wait_for(NOT_SERVING)  # draining, and would wait up to 60 s for the stream
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGINT)
        exit_code = server.wait_exit(CALL_TIMEOUT_S)
        exited_in = time.monotonic() - signalled
        stream.join(HEALTH_TIMEOUT_S)

    assert exit_code == 128 + signal.SIGINT, server.log_text()
    # At once: nowhere near the 60 s the drain would have given the stream.
    assert exited_in < HEALTH_TIMEOUT_S, f"exit took {exited_in:.1f} s"
    # The stream was cut with the process: an error, never a clean finish.
    assert stream.error is not None
    assert stream.error.code() == grpc.StatusCode.UNAVAILABLE, stream.error
    assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in stream.responses)
    assert "exiting now" in server.log_text()


@pytest.mark.parametrize("drain_server", [60.0], indirect=True)
def test_idle_triton_stream_does_not_hold_the_drain(drain_server: ServeProcess) -> None:
    """A Triton client that keeps its ModelStreamInfer stream open after its work is done must
    not keep the process alive until the drain deadline."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    responses: list[object] = []
    client = grpcclient.InferenceServerClient(drain_server.address)
    try:
        name = GenerationClient(drain_server.address).model_info().model_name
        text = grpcclient.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"hello"], dtype=np.object_))
        stream = grpcclient.InferInput("stream", [1], "BOOL")
        stream.set_data_from_numpy(np.array([True]))
        client.start_stream(callback=lambda result, error: responses.append(result or error))
        client.async_stream_infer(name, [text, stream], request_id="1",
                                  parameters={"max_tokens": 3, "temperature": 0})
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while not any(
            r is not None and hasattr(r, "get_response")
            and r.get_response().parameters["triton_final_response"].bool_param
            for r in responses
        ):
            assert time.monotonic() < deadline, "the stream's request never finished"
            time.sleep(0.05)
        # The stream stays open and idle; the drain must still end promptly.
        started = time.monotonic()
        drain_server.process.send_signal(signal.SIGTERM)
        assert drain_server.wait_exit(timeout_s=30.0) == 0
        assert time.monotonic() - started < 30.0
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
