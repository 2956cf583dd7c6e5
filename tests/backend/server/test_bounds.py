"""Per-request and per-connection bounds: each refused with its status code, naming the limit;
and a reader that never reads cannot grow the server's memory beyond its requests' outputs."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from pagedserve.backend.config import EngineConfig, ServerConfig, TelemetryConfig
from pagedserve.backend.server.server import BackgroundServer
from pagedserve.clients.client import GenerationClient
from pagedserve.v1 import generation_pb2 as pb
from tests.backend.server.harness import TINY_ENGINE, SlowSteps, all_blocks_free, wait_for
from tests.backend.server.serve_process import launch

LIMITS = dict(max_prompt_tokens=32, max_output_tokens=20, max_stop_strings=2,
              max_stop_string_chars=8)
MESSAGE_LIMIT = 64 * 1024
STREAMS_PER_CONNECTION = 2


@pytest.fixture(scope="module")
def bounded(tiny_llama_dir: Path) -> Iterator[BackgroundServer]:
    server = BackgroundServer(
        ServerConfig(
            host="127.0.0.1", port=0, http_port=None, telemetry=TelemetryConfig(metrics_port=None),
            max_message_bytes=MESSAGE_LIMIT, max_concurrent_streams=STREAMS_PER_CONNECTION,
        ),
        EngineConfig.from_kwargs(model=str(tiny_llama_dir), **TINY_ENGINE, **LIMITS),
    )
    server.start()
    server.wait_ready()
    yield server
    server.stop()


def _refused(call: object, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    assert info.value.code() == code, info.value.details()
    return info.value.details()


@pytest.mark.parametrize(
    ("kwargs", "field", "flag"),
    [
        ({"prompt_token_ids": list(range(100, 140))}, "prompt", "--max-prompt-tokens"),
        ({"max_tokens": 21}, "max_tokens", "--max-output-tokens"),
        ({"stop": ["a", "b", "c"]}, "stop", "--max-stop-strings"),
        ({"stop": ["a stop too long"]}, "stop", "--max-stop-string-chars"),
    ],
)
def test_a_request_over_a_limit_is_invalid_argument_naming_it(
    bounded: BackgroundServer, kwargs: dict, field: str, flag: str
) -> None:
    params = {"prompt": "Hello", "max_tokens": 4, **kwargs}
    if "prompt_token_ids" in params:
        del params["prompt"]
    with GenerationClient(bounded.address) as client:
        details = _refused(lambda: client.complete(**params), grpc.StatusCode.INVALID_ARGUMENT)
        assert details.startswith(f"{field}:") and flag in details, details
        # At the limit it is served.
        at_limit = {**params}
        if field == "prompt":
            at_limit["prompt_token_ids"] = list(range(100, 132))
        elif field == "max_tokens":
            at_limit["max_tokens"] = 20
        elif flag == "--max-stop-strings":
            at_limit["stop"] = ["a", "b"]
        else:
            at_limit["stop"] = ["8 chars!"]
        assert client.complete(**at_limit).finish_reason in (
            pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP
        )


def test_the_same_limits_hold_for_kserve(bounded: BackgroundServer) -> None:
    triton = triton_grpc.InferenceServerClient(bounded.address)
    text = triton_grpc.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array(["Hi"], dtype=object))
    params = triton_grpc.InferInput("sampling_parameters", [1], "BYTES")
    params.set_data_from_numpy(np.array(['{"max_tokens": 50}'], dtype=object))
    with pytest.raises(InferenceServerException) as info:
        triton.infer(bounded.state.served_model_name, [text, params])
    assert "max_tokens" in info.value.message() and "--max-output-tokens" in info.value.message()
    triton.close()


def test_a_message_over_the_size_limit_is_resource_exhausted(bounded: BackgroundServer) -> None:
    with GenerationClient(bounded.address) as client:
        details = _refused(
            lambda: client.complete("x" * (MESSAGE_LIMIT + 1), max_tokens=2),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
        assert "larger than max" in details
        assert client.complete("small", max_tokens=2).usage.completion_tokens == 2


def test_a_connection_runs_at_most_its_stream_limit_at_once(bounded: BackgroundServer) -> None:
    """Three streams on one connection limited to two: the third waits for a free stream
    (HTTP/2 flow, no error), so the engine never sees more than two of them at once."""
    slow = SlowSteps(bounded, 0.01)
    most = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal most
        assert bounded.state.engine is not None
        while not done.is_set():
            load = bounded.state.engine.get_load()
            most = max(most, load.num_running + load.num_waiting)
            time.sleep(0.002)

    with GenerationClient(bounded.address) as client, slow.on():
        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            calls = [
                client.stub.Complete.future(pb.GenerateRequest(prompt="Go", max_tokens=12,
                                                               ignore_eos=True))
                for _ in range(3)
            ]
            replies = [c.result(timeout=60) for c in calls]
        finally:
            done.set()
            watcher.join()
    assert [r.usage.completion_tokens for r in replies] == [12, 12, 12]
    assert most == STREAMS_PER_CONNECTION
    with GenerationClient(bounded.address) as client:
        wait_for(lambda: all_blocks_free(client), 10, "the blocks to be free")


# Readers that never read: 32 streams (the tiny engine's max_num_seqs) of 480 tokens each,
# nothing taken off the socket. The server keeps each stream's unsent output merged in one
# pending message (at most max_tokens' text and ids, ~20 KB) and gRPC's flow control stops its
# writes (a window of 64 KB per stream): about 3 MB for all of them. The bound leaves room for
# the allocator (its noise measured 0.5-14 MB between runs on an idle machine, up to 37 MB with
# other test servers busy on the same two cores); keeping a copy of a stream's text per step,
# say, adds ~100 MB (measured: 104 MB).
NEVER_READ_STREAMS, NEVER_READ_TOKENS = 32, 480
RSS_GROWTH_BOUND = 64 * 1024 * 1024


def test_readers_that_never_read_do_not_grow_the_server_without_bound(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    server = launch(tiny_llama_dir, tmp_path / "serve.log", step_delay_s=0.0, drain_timeout_s=5)
    try:
        address = server.wait_listening()
        server.wait_serving()
        process = psutil.Process(server.pid)
        channel = grpc.insecure_channel(
            address, options=[("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
        )
        generate = channel.unary_stream(
            "/pagedserve.v1.GenerationService/Generate",
            request_serializer=pb.GenerateRequest.SerializeToString,
            response_deserializer=pb.GenerateResponse.FromString,
        )
        # The same work with readers first, so the allocations a batch of 16 makes anyway
        # (activations, allocator arenas) are in the baseline and only what never-read
        # streams keep is measured.
        with GenerationClient(address) as warm:
            read = [
                warm.stub.Complete.future(pb.GenerateRequest(
                    prompt=f"Read {i}", max_tokens=NEVER_READ_TOKENS, ignore_eos=True))
                for i in range(NEVER_READ_STREAMS)
            ]
            assert all(r.result(timeout=120).usage.completion_tokens == NEVER_READ_TOKENS
                       for r in read)
        before = process.memory_info().rss
        calls = [
            generate(pb.GenerateRequest(prompt=f"Never read {i}", max_tokens=NEVER_READ_TOKENS,
                                        ignore_eos=True))
            for i in range(NEVER_READ_STREAMS)
        ]
        with GenerationClient(address) as client:
            wait_for(lambda: client.load().num_running == 0 and client.load().num_waiting == 0,
                     120, "the engine to finish every never-read request")
            grown = process.memory_info().rss - before
            for call in calls:
                call.cancel()
            channel.close()
            wait_for(lambda: all_blocks_free(client), 10, "the blocks to be free")
        print(f"server RSS grew {grown / 2**20:.1f} MiB with {NEVER_READ_STREAMS} never-read streams")
        assert grown < RSS_GROWTH_BOUND, f"server RSS grew {grown / 2**20:.1f} MiB"
    finally:
        server.kill()
