"""inference.GRPCInferenceService against a real server, driven by the real tritonclient.

The server is the package's shared tiny-model server (native API and KServe on one port);
greedy KServe text is compared with the native GenerationService's for the same prompt.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aiogrpcclient
from tritonclient.grpc import service_pb2 as triton_service
from tritonclient.grpc import service_pb2_grpc as triton_service_grpc
from tritonclient.utils import InferenceServerException

from pagedserve.backend.config import EngineConfig, ServerConfig, TelemetryConfig
from pagedserve.backend.server.server import BackgroundServer
from pagedserve.clients.client import GenerationClient
from tests.backend.server.harness import TINY_ENGINE, SlowSteps, gated_model_loading, all_blocks_free, wait_for

MAX_TOKENS = 16
GREEDY = {"temperature": "0", "max_tokens": str(MAX_TOKENS), "ignore_eos": "true"}
PROMPTS = [f"Story {i}: once upon a time" + " there was" * (i % 3) for i in range(8)]
LONG = {"temperature": 0, "max_tokens": 500, "ignore_eos": True}
RETURN_ALL = ("return_finish_reason", "return_num_input_tokens", "return_num_output_tokens")
# Engine steps of slack for an abort to land and the blocks to show as free.
FREE_TIMEOUT_S = 5.0
STREAM_TIMEOUT_S = 60.0
# Far shorter than a 500-token request at slowed steps.
SHORT_STREAM_TIMEOUT_S = 1.0


# ---- helpers ----------------------------------------------------------------------------------


def make_inputs(
    prompt: str | None,
    *,
    stream: bool | None = None,
    sampling: dict[str, Any] | str | None = None,
    exclude: bool | None = None,
    returns: tuple[str, ...] = (),
) -> list[grpcclient.InferInput]:
    inputs = []
    if prompt is not None:
        inputs.append(grpcclient.InferInput("text_input", [1], "BYTES"))
        inputs[-1].set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    for name, value in {
        "stream": stream,
        "exclude_input_in_output": exclude,
        **dict.fromkeys(returns, True),
    }.items():
        if value is not None:
            inputs.append(grpcclient.InferInput(name, [1], "BOOL"))
            inputs[-1].set_data_from_numpy(np.array([value], dtype=bool))
    if sampling is not None:
        text = sampling if isinstance(sampling, str) else json.dumps(sampling)
        inputs.append(grpcclient.InferInput("sampling_parameters", [1], "BYTES"))
        inputs[-1].set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
    return inputs


def text_of(result: grpcclient.InferResult) -> str:
    data = result.as_numpy("text_output")
    return "" if data is None else data[0].decode()


def is_final(result: grpcclient.InferResult) -> bool:
    params = result.get_response().parameters
    assert "triton_final_response" in params, "every streamed response carries the final flag"
    return params["triton_final_response"].bool_param


class StreamCollector:
    """The sync client's stream callback: results and errors in arrival order."""

    def __init__(self) -> None:
        self.results: list[grpcclient.InferResult] = []
        self.errors: list[InferenceServerException] = []
        self._lock = threading.Lock()

    def __call__(
        self, result: grpcclient.InferResult | None, error: InferenceServerException | None
    ) -> None:
        with self._lock:
            if error is not None:
                self.errors.append(error)
            else:
                assert result is not None
                self.results.append(result)

    def by_id(self) -> dict[str, list[grpcclient.InferResult]]:
        grouped: dict[str, list[grpcclient.InferResult]] = defaultdict(list)
        for result in self.results:
            grouped[result.get_response().id].append(result)
        return grouped


@pytest.fixture(scope="module")
def model(tiny_server: BackgroundServer) -> str:
    return tiny_server.state.served_model_name


@pytest.fixture(scope="module")
def native_text(tiny_server: BackgroundServer) -> dict[str, str]:
    """Greedy completions of PROMPTS from the native API (the reference)."""
    with GenerationClient(tiny_server.address) as native:
        return {
            p: native.complete(p, temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True).text
            for p in PROMPTS
        }


@pytest.fixture
def triton(tiny_server: BackgroundServer) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(tiny_server.address) as client:
        yield client


@pytest.fixture
def native(tiny_server: BackgroundServer) -> Iterator[GenerationClient]:
    with GenerationClient(tiny_server.address) as client:
        yield client


# ---- decoupled streaming ------------------------------------------------------------------


def test_sync_stream_eight_concurrent_requests_match_native(
    triton: grpcclient.InferenceServerClient,
    model: str,
    native_text: dict[str, str],
    slow_steps: SlowSteps,
) -> None:
    collector = StreamCollector()
    triton.start_stream(callback=collector, stream_timeout=STREAM_TIMEOUT_S)
    with slow_steps.on():  # keeps all eight in the engine at once
        for i, prompt in enumerate(PROMPTS):
            triton.async_stream_infer(
                model, make_inputs(prompt, stream=True), request_id=f"req-{i}", parameters=GREEDY
            )
        triton.stop_stream()  # half-closes, then waits for every response
    assert collector.errors == []
    grouped = collector.by_id()
    assert set(grouped) == {f"req-{i}" for i in range(len(PROMPTS))}
    for i, prompt in enumerate(PROMPTS):
        results = grouped[f"req-{i}"]
        finals = [is_final(r) for r in results]
        assert finals == [False] * (len(results) - 1) + [True]
        assert all(r.get_response().model_name == model for r in results)
        assert "".join(text_of(r) for r in results) == native_text[prompt]
    # Multiplexed, not one after another: responses of different requests interleave.
    ids = [r.get_response().id for r in collector.results]
    switches = sum(a != b for a, b in zip(ids, ids[1:], strict=False))
    assert switches > 2 * len(PROMPTS)


async def test_aio_stream_infer_matches_native(
    tiny_server: BackgroundServer, model: str, native_text: dict[str, str]
) -> None:
    async def requests() -> AsyncIterator[dict[str, Any]]:
        for i, prompt in enumerate(PROMPTS):
            yield {
                "model_name": model,
                "inputs": make_inputs(prompt, stream=True, sampling=GREEDY),
                "request_id": f"aio-{i}",
            }

    texts: dict[str, str] = defaultdict(str)
    finished: list[str] = []
    async with aiogrpcclient.InferenceServerClient(tiny_server.address) as client:
        async for result, error in client.stream_infer(requests(), stream_timeout=STREAM_TIMEOUT_S):
            assert error is None
            response_id = result.get_response().id
            assert response_id not in finished, "no response after the final one"
            texts[response_id] += text_of(result)
            if is_final(result):
                finished.append(response_id)
    assert sorted(finished) == sorted(f"aio-{i}" for i in range(len(PROMPTS)))
    for i, prompt in enumerate(PROMPTS):
        assert texts[f"aio-{i}"] == native_text[prompt]


def test_non_streaming_request_on_stream_sends_prompt_plus_text_once(
    triton: grpcclient.InferenceServerClient, model: str, native_text: dict[str, str]
) -> None:
    collector = StreamCollector()
    triton.start_stream(callback=collector, stream_timeout=STREAM_TIMEOUT_S)
    triton.async_stream_infer(model, make_inputs(PROMPTS[0], sampling=GREEDY), request_id="whole")
    triton.stop_stream()
    assert collector.errors == []
    (result,) = collector.results
    assert is_final(result)
    assert text_of(result) == PROMPTS[0] + native_text[PROMPTS[0]]


def test_additional_outputs_per_streamed_response(
    triton: grpcclient.InferenceServerClient, model: str, native: GenerationClient
) -> None:
    collector = StreamCollector()
    triton.start_stream(callback=collector, stream_timeout=STREAM_TIMEOUT_S)
    triton.async_stream_infer(
        model,
        make_inputs(PROMPTS[1], stream=True, sampling=GREEDY, returns=RETURN_ALL),
        request_id="x",
    )
    triton.stop_stream()
    assert collector.errors == []
    results = collector.results
    reasons = [r.as_numpy("finish_reason")[0].decode() for r in results]
    assert reasons == ["None"] * (len(results) - 1) + ["length"]
    num_prompt = len(native.tokenize(PROMPTS[1]))
    assert all(r.as_numpy("num_input_tokens").tolist() == [num_prompt] for r in results)
    assert sum(int(r.as_numpy("num_output_tokens")[0]) for r in results) == MAX_TOKENS
    assert all(r.as_numpy("num_output_tokens").dtype == np.uint32 for r in results)


def test_empty_final_response_is_honoured(
    triton: grpcclient.InferenceServerClient, model: str, native_text: dict[str, str]
) -> None:
    collector = StreamCollector()
    triton.start_stream(callback=collector, stream_timeout=STREAM_TIMEOUT_S)
    triton.async_stream_infer(
        model,
        make_inputs(PROMPTS[2], stream=True, sampling=GREEDY),
        request_id="e",
        enable_empty_final_response=True,
    )
    triton.stop_stream()
    assert collector.errors == []
    *data, last = collector.results
    assert data and not any(is_final(r) for r in data)
    assert is_final(last)
    assert len(last.get_response().outputs) == 0 and last.get_response().id == "e"
    assert "".join(text_of(r) for r in data) == native_text[PROMPTS[2]]


# ---- unary, health, metadata, configuration, statistics ----------------------------------


def test_unary_infer_returns_the_whole_text(
    triton: grpcclient.InferenceServerClient, model: str, native_text: dict[str, str]
) -> None:
    full = triton.infer(
        model, make_inputs(PROMPTS[3], stream=False), parameters=GREEDY, request_id="u"
    )
    assert text_of(full) == PROMPTS[3] + native_text[PROMPTS[3]]
    assert full.get_response().id == "u"
    only_new = triton.infer(
        model, make_inputs(PROMPTS[3], sampling=GREEDY, exclude=True, returns=RETURN_ALL)
    )
    assert text_of(only_new) == native_text[PROMPTS[3]]
    assert only_new.as_numpy("finish_reason")[0] == b"length"
    assert only_new.as_numpy("num_output_tokens").tolist() == [MAX_TOKENS]


def test_health_metadata_and_config(triton: grpcclient.InferenceServerClient, model: str) -> None:
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready(model)
    assert triton.is_model_ready(model, "1")
    assert not triton.is_model_ready("no-such-model")
    server = triton.get_server_metadata()
    assert server.name == "pagedserve" and "model_configuration" in server.extensions
    metadata = triton.get_model_metadata(model)
    assert metadata.name == model and list(metadata.versions) == ["1"]
    inputs = {t.name: (t.datatype, list(t.shape)) for t in metadata.inputs}
    assert inputs["text_input"] == ("BYTES", [1]) and inputs["stream"] == ("BOOL", [1])
    assert {t.name for t in metadata.outputs} >= {"text_output", "finish_reason"}
    config = triton.get_model_config(model).config
    assert config.name == model and config.max_batch_size == 0
    assert config.model_transaction_policy.decoupled is True
    optional = {i.name: i.optional for i in config.input}
    assert optional["text_input"] is False
    assert all(optional[name] for name in optional if name != "text_input")
    assert {i.name: i.data_type for i in config.input}[
        "text_input"
    ] == triton_service.model__config__pb2.TYPE_STRING


async def test_aio_health_metadata_and_unary(
    tiny_server: BackgroundServer, model: str, native_text: dict[str, str]
) -> None:
    async with aiogrpcclient.InferenceServerClient(tiny_server.address) as client:
        assert await client.is_server_live() and await client.is_server_ready()
        assert await client.is_model_ready(model)
        assert (await client.get_model_metadata(model)).name == model
        assert (await client.get_model_config(model)).config.model_transaction_policy.decoupled
        result = await client.infer(model, make_inputs(PROMPTS[4], stream=False, sampling=GREEDY))
        assert text_of(result) == PROMPTS[4] + native_text[PROMPTS[4]]


def test_statistics_count_requests(triton: grpcclient.InferenceServerClient, model: str) -> None:
    def success() -> tuple[int, int]:
        stats = triton.get_inference_statistics(model).model_stats
        assert [s.name for s in stats] == [model]
        return stats[0].inference_stats.success.count, stats[0].inference_stats.success.ns

    count, ns = success()
    triton.infer(model, make_inputs("Count me", sampling={"max_tokens": 2}))
    with pytest.raises(InferenceServerException):
        triton.infer(model, make_inputs(None))
    after_count, after_ns = success()
    assert after_count == count + 1 and after_ns > ns
    stats = triton.get_inference_statistics(model).model_stats[0]
    assert stats.inference_stats.fail.count >= 1
    assert stats.inference_stats.queue.count >= 1 and stats.last_inference > 0
    assert len(triton.get_inference_statistics().model_stats) == 1


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.get_model_repository_index(),
        lambda c: c.load_model("other"),
        lambda c: c.get_system_shared_memory_status(),
        lambda c: c.get_cuda_shared_memory_status(),
        lambda c: c.get_trace_settings(),
        lambda c: c.get_log_settings(),
    ],
)
def test_other_methods_are_unimplemented_with_a_reason(
    triton: grpcclient.InferenceServerClient, call: Any
) -> None:
    with pytest.raises(InferenceServerException) as info:
        call(triton)
    assert info.value.status() == "StatusCode.UNIMPLEMENTED"
    assert "not implemented" in info.value.message()


# ---- bad input ----------------------------------------------------------------------------


def _int32_text_input() -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("text_input", [1], "INT32")
    tensor.set_data_from_numpy(np.array([7], dtype=np.int32))
    return [tensor]


def _two_prompts() -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("text_input", [2], "BYTES")
    tensor.set_data_from_numpy(np.array([b"a", b"b"], dtype=np.object_))
    return [tensor]


BAD_REQUESTS: list[tuple[str, Any, str]] = [
    ("missing text_input", lambda: make_inputs(None, sampling={"max_tokens": 2}), "text_input"),
    ("wrong datatype", _int32_text_input, "unexpected datatype"),
    ("wrong shape", _two_prompts, "unexpected shape"),
    ("bad JSON", lambda: make_inputs("Hi", sampling="{max_tokens: 2"), "not valid JSON"),
    ("bad value", lambda: make_inputs("Hi", sampling={"max_tokens": "lots"}), "max_tokens"),
    ("invalid value", lambda: make_inputs("Hi", sampling={"temperature": -1}), "temperature"),
    ("unknown parameter", lambda: make_inputs("Hi", sampling={"beam_width": 2}), "beam_width"),
    # Past what the sampler's int64 and float32 tensors hold (top_k failed the whole step).
    ("top_k past int64",
     lambda: make_inputs("Hi", sampling={"top_k": 2**63, "temperature": 1.0, "max_tokens": 2}),
     "top_k"),
    ("temperature past float32",
     lambda: make_inputs("Hi", sampling={"temperature": 1e39, "max_tokens": 2}), "temperature"),
    # JSON the parser cannot hold: nested past its stack, a number of 5000 digits.
    ("deep JSON", lambda: make_inputs("Hi", sampling='{"stop": ' + "[" * 50_000 + "]" * 50_000
                                      + "}"), "not valid JSON"),
    ("long number", lambda: make_inputs("Hi", sampling='{"max_tokens": ' + "9" * 5000 + "}"),
     "not valid JSON"),
    ("integer past float",
     lambda: make_inputs("Hi", sampling='{"temperature": ' + "9" * 400 + "}"), "temperature"),
]


@pytest.mark.parametrize(
    ("label", "inputs", "message"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS]
)
def test_unary_bad_input_is_invalid_argument(
    triton: grpcclient.InferenceServerClient, model: str, label: str, inputs: Any, message: str
) -> None:
    with pytest.raises(InferenceServerException) as info:
        triton.infer(model, inputs())
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT", label
    assert message in info.value.message()
    assert text_of(triton.infer(model, make_inputs("Still serving", sampling={"max_tokens": 2})))


def test_unary_unknown_model_and_stream_flag(
    triton: grpcclient.InferenceServerClient, model: str
) -> None:
    with pytest.raises(InferenceServerException) as info:
        triton.infer("no-such-model", make_inputs("Hi"))
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert "Request for unknown model: 'no-such-model' is not found" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        triton.infer(model, make_inputs("Hi"), model_version="7")
    assert "version 7" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        triton.get_model_metadata("no-such-model")
    assert "no-such-model" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        triton.infer(model, make_inputs("Hi", stream=True))
    assert (
        info.value.status() == "StatusCode.INVALID_ARGUMENT"
        and "ModelStreamInfer" in info.value.message()
    )


def test_stream_bad_input_is_answered_in_band_and_the_stream_goes_on(
    triton: grpcclient.InferenceServerClient, model: str, native_text: dict[str, str]
) -> None:
    collector = StreamCollector()
    triton.start_stream(callback=collector, stream_timeout=STREAM_TIMEOUT_S)
    triton.async_stream_infer(
        "no-such-model", make_inputs("Hi", stream=True), request_id="bad-model"
    )
    for i, (_, inputs, _) in enumerate(BAD_REQUESTS):
        triton.async_stream_infer(model, inputs(), request_id=f"bad-{i}")
    triton.async_stream_infer(
        model, make_inputs("Hi", stream=True, exclude=False), request_id="bad-exclude"
    )
    triton.async_stream_infer(
        model, make_inputs(PROMPTS[5], stream=True, sampling=GREEDY), request_id="good"
    )
    triton.stop_stream()
    messages = sorted(e.message() for e in collector.errors)
    assert len(messages) == len(BAD_REQUESTS) + 2
    assert any(
        "[request id: bad-model] Request for unknown model: 'no-such-model'" in m for m in messages
    )
    for i, (_, _, expected) in enumerate(BAD_REQUESTS):
        assert any(m.startswith(f"[request id: bad-{i}]") and expected in m for m in messages), (
            expected
        )
    assert any("bad-exclude" in m and "exclude_input_in_output" in m for m in messages)
    good = collector.by_id()["good"]
    assert "".join(text_of(r) for r in good) == native_text[PROMPTS[5]] and is_final(good[-1])


def test_typed_contents_and_in_band_errors_over_raw_grpc(
    tiny_server: BackgroundServer, model: str
) -> None:
    # tritonclient's generated stub (not its helper classes): typed contents instead of raw
    # bytes, and the error response keeps the request id.
    good = triton_service.ModelInferRequest(model_name=model, id="typed")
    text = good.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    text.contents.bytes_contents.append(b"Typed contents")
    sampling = good.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1])
    sampling.contents.bytes_contents.append(b'{"max_tokens": 3, "temperature": 0}')
    bad = triton_service.ModelInferRequest(model_name=model, id="no-text")
    with grpc.insecure_channel(tiny_server.address) as channel:
        stub = triton_service_grpc.GRPCInferenceServiceStub(channel)
        unary = stub.ModelInfer(good, timeout=STREAM_TIMEOUT_S)
        assert unary.id == "typed" and len(unary.raw_output_contents) == 1
        responses = list(stub.ModelStreamInfer(iter([bad, good]), timeout=STREAM_TIMEOUT_S))
    errors = [r for r in responses if r.error_message]
    assert len(errors) == 1 and errors[0].infer_response.id == "no-text"
    assert errors[0].infer_response.parameters["triton_final_response"].bool_param
    assert [r.infer_response.id for r in responses if not r.error_message] == ["typed"]


# ---- cancellation -------------------------------------------------------------------------


def test_cancelled_stream_aborts_its_requests_and_frees_blocks(
    triton: grpcclient.InferenceServerClient,
    model: str,
    native: GenerationClient,
    slow_steps: SlowSteps,
) -> None:
    collector = StreamCollector()
    with slow_steps.on():
        triton.start_stream(callback=collector, stream_timeout=STREAM_TIMEOUT_S)
        for i in range(3):
            triton.async_stream_infer(
                model,
                make_inputs(f"Long story {i}", stream=True, sampling=LONG),
                request_id=f"long-{i}",
            )
        wait_for(
            lambda: len(collector.by_id()) == 3, FREE_TIMEOUT_S, "a response for every request"
        )
        load = native.load()
        assert load.num_running == 3 and load.num_free_blocks < load.num_total_blocks
        triton.stop_stream(cancel_requests=True)
        wait_for(
            lambda: all_blocks_free(native), FREE_TIMEOUT_S, "blocks after the stream was cancelled"
        )
    assert not any(is_final(r) for r in collector.results)


def test_stream_timeout_aborts_its_requests_and_frees_blocks(
    triton: grpcclient.InferenceServerClient,
    model: str,
    native: GenerationClient,
    slow_steps: SlowSteps,
) -> None:
    collector = StreamCollector()
    with slow_steps.on():
        triton.start_stream(callback=collector, stream_timeout=SHORT_STREAM_TIMEOUT_S)
        triton.async_stream_infer(model, make_inputs("Endless", stream=True, sampling=LONG))
        wait_for(lambda: bool(collector.errors), FREE_TIMEOUT_S, "the stream's deadline")
        wait_for(lambda: all_blocks_free(native), FREE_TIMEOUT_S, "blocks after the deadline")
        triton.stop_stream()
    assert collector.errors[0].status() == "StatusCode.DEADLINE_EXCEEDED"
    assert collector.results and not any(is_final(r) for r in collector.results)


async def test_aio_stream_cancel_and_client_close_free_blocks(
    tiny_server: BackgroundServer, model: str, native: GenerationClient, slow_steps: SlowSteps
) -> None:
    async def long_requests(n: int) -> AsyncIterator[dict[str, Any]]:
        for i in range(n):
            yield {
                "model_name": model,
                "inputs": make_inputs(f"Tale {i}", stream=True, sampling=LONG),
            }
        await asyncio.Event().wait()  # keep the stream open, as a client with more to send

    async def free() -> None:
        for _ in range(int(FREE_TIMEOUT_S / 0.05)):
            if all_blocks_free(native):
                return
            await asyncio.sleep(0.05)
        raise AssertionError("blocks not freed")

    async def both_running(responses: Any) -> None:
        async for _result, error in responses:
            assert error is None
            if native.load().num_running == 2:
                return
        raise AssertionError("the stream ended before both requests ran")

    with slow_steps.on():
        async with aiogrpcclient.InferenceServerClient(tiny_server.address) as client:
            responses = client.stream_infer(long_requests(2))
            await asyncio.wait_for(both_running(responses), FREE_TIMEOUT_S)
            responses.cancel()
        await free()
        # Closing the client (its channel) mid-stream aborts as well.
        client = aiogrpcclient.InferenceServerClient(tiny_server.address)
        await asyncio.wait_for(both_running(client.stream_infer(long_requests(2))), FREE_TIMEOUT_S)
        await client.close()
        await free()


# ---- loading phase ------------------------------------------------------------------------


@pytest.fixture
def gated_loading(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    with gated_model_loading(monkeypatch, STREAM_TIMEOUT_S) as gate:
        yield gate


def test_loading_model_is_not_ready_and_inference_unavailable(
    tiny_llama_dir: Path, gated_loading: threading.Event
) -> None:
    server = BackgroundServer(
        ServerConfig(
            host="127.0.0.1", port=0, http_port=0, drain_timeout_s=5.0,
            telemetry=TelemetryConfig(metrics_port=0),
        ),
        EngineConfig.from_kwargs(model=str(tiny_llama_dir), **TINY_ENGINE),
    )
    with server, grpcclient.InferenceServerClient(server.address) as client:
        model = server.state.served_model_name
        assert client.is_server_live()
        assert not client.is_server_ready() and not client.is_model_ready(model)
        with pytest.raises(InferenceServerException) as info:
            client.infer(model, make_inputs("Hi"))
        assert info.value.status() == "StatusCode.UNAVAILABLE"
        assert "loading" in info.value.message()
        collector = StreamCollector()
        client.start_stream(callback=collector, stream_timeout=STREAM_TIMEOUT_S)
        client.async_stream_infer(model, make_inputs("Hi", stream=True), request_id="early")
        client.stop_stream()
        assert [e.message() for e in collector.errors] == ["[request id: early] model is loading"]
        gated_loading.set()
        server.wait_ready(STREAM_TIMEOUT_S)
        assert client.is_server_ready() and client.is_model_ready(model)
        assert text_of(client.infer(model, make_inputs("Hi", sampling={"max_tokens": 2})))


# ---- n choices ------------------------------------------------------------------------------
CHOICES = {"temperature": 1.0, "seed": 5, "max_tokens": 8, "ignore_eos": True}


def test_unary_n_gives_one_entry_per_choice_equal_to_seeded_requests(
    triton: grpcclient.InferenceServerClient, model: str
) -> None:
    inputs = make_inputs(PROMPTS[1], sampling={**CHOICES, "n": "3"}, exclude=True, returns=RETURN_ALL)
    result = triton.infer(model, inputs)
    texts = [t.decode() for t in result.as_numpy("text_output")]
    assert len(texts) == 3 and len(set(texts)) == 3
    assert result.as_numpy("finish_reason").tolist() == [b"length"] * 3
    assert result.as_numpy("num_output_tokens").tolist() == [8] * 3
    assert result.as_numpy("num_input_tokens").shape == (1,)
    for i, text in enumerate(texts):
        alone = triton.infer(
            model, make_inputs(PROMPTS[1], sampling={**CHOICES, "seed": 5 + i}, exclude=True)
        )
        assert text_of(alone) == text


def test_streamed_n_interleaves_choices_and_ends_when_all_have(
    triton: grpcclient.InferenceServerClient, model: str
) -> None:
    collector = StreamCollector()
    triton.start_stream(callback=collector, stream_timeout=STREAM_TIMEOUT_S)
    triton.async_stream_infer(
        model,
        make_inputs(PROMPTS[2], stream=True, returns=RETURN_ALL),
        request_id="n2",
        parameters={k: str(v) for k, v in {**CHOICES, "n": 2}.items()},
    )
    triton.stop_stream()
    assert collector.errors == []
    results = collector.results
    assert [is_final(r) for r in results] == [False] * (len(results) - 1) + [True]
    texts = ["", ""]
    counts = [0, 0]
    for r in results:
        for i, (piece, count) in enumerate(
            zip(r.as_numpy("text_output"), r.as_numpy("num_output_tokens"), strict=True)
        ):
            texts[i] += piece.decode()
            counts[i] += int(count)
    assert counts == [8, 8]
    assert results[-1].as_numpy("finish_reason").tolist() == [b"length"] * 2
    whole = triton.infer(
        model, make_inputs(PROMPTS[2], sampling={**CHOICES, "n": 2}, exclude=True)
    )
    assert texts == [t.decode() for t in whole.as_numpy("text_output")]


@pytest.mark.parametrize("n", ["0", "129", "two", "2.5"])
def test_bad_n_is_invalid_argument(
    triton: grpcclient.InferenceServerClient, model: str, n: str
) -> None:
    with pytest.raises(InferenceServerException) as info:
        triton.infer(model, make_inputs(PROMPTS[0], sampling=f'{{"n": "{n}"}}'))
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "n: " in info.value.message()
