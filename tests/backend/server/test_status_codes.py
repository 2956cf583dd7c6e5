"""Every bad request gets its own status code and a message naming the field; nothing else
breaks."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from pagedserve.backend.server.server import BackgroundServer
from pagedserve.clients.client import GenerationClient
from pagedserve.v1 import generation_pb2 as pb
from tests.backend.server.harness import SlowSteps, all_blocks_free, running_server, wait_for

VOCAB = 49152  # the tiny model's vocabulary
MAX_MODEL_LEN = 1024  # its context

# (request fields, the field the error must name)
INVALID: list[tuple[dict[str, Any], str]] = [
    ({"prompt": "hi", "temperature": -0.5}, "temperature"),
    ({"prompt": "hi", "temperature": math.nan}, "temperature"),
    # Beyond float32, where the sampler would hold it as inf.
    ({"prompt": "hi", "temperature": math.inf}, "temperature"),
    ({"prompt": "hi", "temperature": 1e39}, "temperature"),
    ({"prompt": "hi", "top_p": 0.0}, "top_p"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "hi", "top_k": 0}, "top_k"),
    ({"prompt": "hi", "top_k": -2}, "top_k"),
    ({"prompt": "hi", "min_p": 1.5}, "min_p"),
    ({"prompt": "hi", "repetition_penalty": 0.0}, "repetition_penalty"),
    ({"prompt": "hi", "repetition_penalty": math.inf}, "repetition_penalty"),
    ({"prompt": "hi", "repetition_penalty": 1e39}, "repetition_penalty"),
    ({"prompt": "hi", "presence_penalty": 2.5}, "presence_penalty"),
    ({"prompt": "hi", "frequency_penalty": -2.5}, "frequency_penalty"),
    ({"prompt": "hi", "seed": -1}, "seed"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": -3}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": MAX_MODEL_LEN + 1}, "max_tokens"),
    ({"prompt": "hi", "min_tokens": -1}, "min_tokens"),
    ({"prompt": "hi", "max_tokens": 4, "min_tokens": 5}, "min_tokens"),
    ({"prompt": "hi", "stop": ["ok", ""]}, "stop"),
    ({"prompt": "hi", "stop_token_ids": [-1]}, "stop_token_ids"),
    ({"prompt": "hi", "stop_token_ids": [VOCAB]}, "stop_token_ids"),
    ({"prompt": "hi", "logprobs": -1}, "logprobs"),
    ({"prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"prompt": ""}, "prompt"),
    # Control characters the tokenizer drops: a prompt of no tokens.
    ({"prompt": "\x04\x06"}, "prompt"),
    ({"prompt": "word " * (MAX_MODEL_LEN + 10)}, "prompt"),
    ({"prompt_token_ids": []}, "prompt_token_ids"),
    ({"prompt_token_ids": [5, -1]}, "prompt_token_ids"),
    ({"prompt_token_ids": [5, VOCAB]}, "prompt_token_ids"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({}, "input"),
]


def _request(fields: dict[str, Any]) -> pb.GenerateRequest:
    request = pb.GenerateRequest()
    for name, value in fields.items():
        if name == "prompt_token_ids":
            request.prompt_token_ids.SetInParent()
            request.prompt_token_ids.ids.extend(value)
        elif name == "messages":
            request.messages.SetInParent()
            for m in value:
                request.messages.messages.add(role=m["role"], content=m["content"])
        elif name in ("stop", "stop_token_ids"):
            getattr(request, name).extend(value)
        else:
            setattr(request, name, value)
    return request


def _expect(code: grpc.StatusCode, call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    return info.value


@pytest.mark.parametrize(
    ("fields", "field"), INVALID, ids=[f"{f}-{i}" for i, (_, f) in enumerate(INVALID)]
)
def test_invalid_field_is_invalid_argument(
    client: GenerationClient, fields: dict[str, Any], field: str
) -> None:
    request = _request(fields)
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    streamed = _expect(invalid, lambda: list(client.stub.Generate(request)))
    assert streamed.details().startswith(f"{field}:"), streamed.details()
    unary = _expect(invalid, lambda: client.stub.Complete(request))
    assert unary.details() == streamed.details()


def test_duplicate_live_request_id_is_invalid(
    client: GenerationClient, slow_steps: SlowSteps
) -> None:
    with slow_steps.on():
        first = client.generate("Hi", request_id="dup", max_tokens=200, ignore_eos=True)
        next(iter(first))  # the first request is live now
        error = _expect(
            grpc.StatusCode.INVALID_ARGUMENT,
            lambda: client.complete("Hi", request_id="dup", max_tokens=2),
        )
        assert error.details().startswith("request_id:")
        first.cancel()
    wait_for(lambda: all_blocks_free(client), 5.0, "the cancelled request's blocks")


@pytest.mark.parametrize(("piece", "length"), [("m", 20_000), ("m", 1_000_000), ("\u00e9", 3000)])
def test_error_quoting_a_huge_value_still_reaches_the_client(
    client: GenerationClient, piece: str, length: int
) -> None:
    """Details travel in a percent-encoded trailer that clients cap at 8-16 KiB; a message
    quoting the client's value in full would end the call with the client's own
    RESOURCE_EXHAUSTED instead (3000 "é" are 18 KiB encoded)."""
    request = pb.GenerateRequest(prompt="hi", model=piece * length, max_tokens=2)
    for _ in range(10):  # over 8 KiB a client refuses at random
        error = _expect(grpc.StatusCode.NOT_FOUND, lambda: client.stub.Complete(request))
        details = error.details()
        assert details.startswith(f"model: '{piece * 3}") and len(details) < 4096, details[:200]
        assert "more characters" in details


def _raw_prompt_request(prompt: bytes) -> bytes:
    """A GenerateRequest serialized by hand, its prompt field holding arbitrary bytes."""
    assert len(prompt) < 128  # one-byte length varint
    max_tokens = pb.GenerateRequest(max_tokens=2).SerializeToString()
    return bytes([3 << 3 | 2, len(prompt)]) + prompt + max_tokens


def test_prompt_with_invalid_utf8_is_invalid_argument(tiny_server: BackgroundServer) -> None:
    with grpc.insecure_channel(tiny_server.address) as channel:
        generate = channel.unary_stream(
            "/pagedserve.v1.GenerationService/Generate",
            request_serializer=lambda raw: raw,
            response_deserializer=pb.GenerateResponse.FromString,
        )
        complete = channel.unary_unary(
            "/pagedserve.v1.GenerationService/Complete",
            request_serializer=lambda raw: raw,
            response_deserializer=pb.GenerateResponse.FromString,
        )
        bad = _raw_prompt_request(b"caf\xc3(")
        error = _expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: list(generate(bad)))
        assert error.details().startswith("prompt:") and "UTF-8" in error.details()
        error = _expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: complete(bad))
        assert error.details().startswith("prompt:")
        # The same bytes path carries valid UTF-8 fine: the server is unharmed.
        good = list(generate(_raw_prompt_request("café".encode())))
        assert good[-1].usage.completion_tokens == 2


def test_chat_content_with_invalid_utf8_names_the_field(tiny_server: BackgroundServer) -> None:
    raw = pb.GenerateRequest(
        messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="XY")])
    ).SerializeToString().replace(b"XY", b"\xff\xfe")
    with grpc.insecure_channel(tiny_server.address) as channel:
        complete = channel.unary_unary(
            "/pagedserve.v1.GenerationService/Complete",
            request_serializer=lambda r: r,
            response_deserializer=pb.GenerateResponse.FromString,
        )
        error = _expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: complete(raw))
    assert error.details().startswith("messages.content:")


def test_tokenize_text_with_invalid_utf8_is_invalid_argument(tiny_server: BackgroundServer) -> None:
    with grpc.insecure_channel(tiny_server.address) as channel:
        tokenize = channel.unary_unary(
            "/pagedserve.v1.GenerationService/Tokenize",
            request_serializer=lambda r: r,
            response_deserializer=pb.TokenizeResponse.FromString,
        )
        error = _expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: tokenize(b"\x0a\x01\x80"))
    assert error.details().startswith("text:")


def test_garbage_bytes_are_invalid_argument(tiny_server: BackgroundServer) -> None:
    with grpc.insecure_channel(tiny_server.address) as channel:
        complete = channel.unary_unary(
            "/pagedserve.v1.GenerationService/Complete",
            request_serializer=lambda r: r,
            response_deserializer=pb.GenerateResponse.FromString,
        )
        error = _expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: complete(b"\x1a\x50ab"))
    assert error.details().startswith("request:")


@pytest.mark.parametrize("method", ["GetModelInfo", "GetLoad"])
def test_garbage_bytes_to_the_read_only_methods_are_invalid_argument(
    tiny_server: BackgroundServer, method: str
) -> None:
    """Their requests have no fields, but bytes that do not parse are still the client's
    mistake, answered as for every other method."""
    with grpc.insecure_channel(tiny_server.address) as channel:
        call = channel.unary_unary(f"/pagedserve.v1.GenerationService/{method}")
        error = _expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: call(b"\x1a\x50ab"))
        assert error.details().startswith("request:")
        assert call(b"")  # the empty request still answers


def test_garbage_bytes_to_health_and_reflection_are_invalid_argument(
    tiny_server: BackgroundServer,
) -> None:
    garbage = b"\x1a\x50ab"
    with grpc.insecure_channel(tiny_server.address) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        watch = channel.unary_stream("/grpc.health.v1.Health/Watch")
        for call in (lambda: check(garbage), lambda: list(watch(garbage, timeout=10))):
            error = _expect(grpc.StatusCode.INVALID_ARGUMENT, call)
            assert error.details().startswith("request:")
        huge = health_pb2.HealthCheckRequest(service="s" * 100_000).SerializeToString()
        error = _expect(grpc.StatusCode.NOT_FOUND, lambda: check(huge))
        assert error.details().startswith("unknown service 'sss") and len(error.details()) < 4096

        reflect = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        )
        listing = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
        replies: list[bytes] = []
        with pytest.raises(grpc.RpcError) as info:
            for reply in reflect(iter([listing, garbage]), timeout=10):
                replies.append(reply)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        services = reflection_pb2.ServerReflectionResponse.FromString(replies[0])
        assert "pagedserve.v1.GenerationService" in {
            s.name for s in services.list_services_response.service
        }


@pytest.fixture
def poisoned(tiny_server: BackgroundServer) -> Iterator[str]:
    """Output processing raises for one request id only, inside the real engine step."""
    engine = tiny_server.state.engine
    assert engine is not None
    output = engine.engine.output
    original = output.process_token
    poison_id = "poisoned-request"

    def process_token(request: Any, *args: Any, **kwargs: Any) -> Any:
        if request.request_id == poison_id:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected detokenizer failure")
        return original(request, *args, **kwargs)

    output.process_token = process_token
    yield poison_id
    output.process_token = original


def test_failure_inside_one_request_is_internal_for_that_request_only(
    client: GenerationClient, poisoned: str
) -> None:
    expected = client.complete("Healthy request", max_tokens=8, temperature=0.0, ignore_eos=True)
    results: dict[str, Any] = {}

    def run(name: str, **kwargs: Any) -> None:
        try:
            results[name] = client.complete("Healthy request", **kwargs)
        except grpc.RpcError as error:
            results[name] = error

    threads = [
        threading.Thread(
            target=run, args=("poison",), kwargs=dict(request_id=poisoned, max_tokens=8)
        ),
        *(
            threading.Thread(
                target=run,
                args=(f"ok{i}",),
                kwargs=dict(max_tokens=8, temperature=0.0, ignore_eos=True),
            )
            for i in range(3)
        ),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    error = results["poison"]
    assert isinstance(error, grpc.RpcError)
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "injected detokenizer failure" in error.details()
    for i in range(3):
        assert list(results[f"ok{i}"].token_ids) == list(expected.token_ids)
    wait_for(lambda: all_blocks_free(client), 5.0, "the failed request's blocks")
    assert client.complete("Still fine", max_tokens=2).usage.completion_tokens == 2


def test_full_waiting_queue_is_resource_exhausted(tiny_llama_dir: Any) -> None:
    # One running sequence and room for one waiting request: the third is refused.
    with running_server(
        tiny_llama_dir, block_size=16, num_blocks=64, max_num_seqs=1, max_queued_requests=1
    ) as server, GenerationClient(server.address) as client:
        slow = SlowSteps(server, 0.02)
        with slow.on():
            running = client.generate("A", max_tokens=300, ignore_eos=True)
            next(iter(running))
            waiting = client.generate("B", max_tokens=300, ignore_eos=True)
            wait_for(lambda: client.load().num_waiting == 1, 5.0, "the second request to queue")
            error = _expect(
                grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: client.complete("C", max_tokens=2)
            )
            assert "queue" in error.details()
            running.cancel()
            waiting.cancel()
        wait_for(lambda: all_blocks_free(client), 5.0, "blocks after cancelling")
        # Room again: the queue limit refuses only while full.
        assert client.complete("D", max_tokens=2).usage.completion_tokens == 2
