"""A huge prompt costs the server only itself: text over ``--max-prompt-bytes`` is refused
before it is tokenized, and a large one is tokenized off the event loop, so the other streams
keep flowing meanwhile."""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import grpc
import pytest
from tritonclient.grpc import service_pb2 as triton_service
from tritonclient.grpc import service_pb2_grpc as triton_service_grpc

from pagedserve.backend.config import RequestLimits
from pagedserve.backend.errors import RequestTooLongError
from pagedserve.backend.server import choices
from pagedserve.backend.server.server import BackgroundServer
from pagedserve.clients.client import GenerationClient
from tests.backend.server.harness import SlowSteps

LIMIT = RequestLimits().max_prompt_bytes
SENTENCE = "The quick brown fox jumps over the lazy dog. "
# Refusing a prompt over the limit reads its size, no more: far less than tokenizing it.
REFUSED_WITHIN_S = 1.0
# The huge prompt below is grown until tokenizing it takes this long.
MIN_TOKENIZE_S = 0.3


class _Engine:
    """What the prompt helpers use of an EngineClient: limits, and tokenizer calls that record
    the thread they ran on."""

    def __init__(self, max_prompt_bytes: int) -> None:
        self.limits = RequestLimits(max_prompt_bytes=max_prompt_bytes)
        self.threads: list[threading.Thread] = []

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.threads.append(threading.current_thread())
        return [len(text)]

    def render_chat(self, messages: list[dict[str, str]], **_: Any) -> list[int]:
        self.threads.append(threading.current_thread())
        return [len(messages)]


def _tokenized(engine: _Engine, text: str) -> list[int]:
    return asyncio.run(choices.tokenized(engine, "prompt", text))  # type: ignore[arg-type]


def test_the_limit_counts_utf8_bytes_not_characters() -> None:
    engine = _Engine(max_prompt_bytes=10)
    assert _tokenized(engine, "é" * 5) == [5]  # 10 bytes: at the limit
    with pytest.raises(RequestTooLongError, match=r"prompt: .*10 bytes \(--max-prompt-bytes\)"):
        _tokenized(engine, "é" * 6)  # 6 characters, 12 bytes
    with pytest.raises(RequestTooLongError):
        _tokenized(engine, "a" * 11)
    messages = [{"role": "user", "content": "a" * 6}, {"role": "user", "content": "b" * 5}]
    with pytest.raises(RequestTooLongError, match="^messages: "):
        asyncio.run(choices.rendered_chat(engine, messages))  # type: ignore[arg-type]


def test_only_large_prompts_leave_the_event_loop() -> None:
    engine = _Engine(max_prompt_bytes=LIMIT)
    here = threading.current_thread()
    _tokenized(engine, "a" * choices.INLINE_TOKENIZE_BYTES)
    _tokenized(engine, "a" * (choices.INLINE_TOKENIZE_BYTES + 1))
    big_chat = [{"role": "user", "content": "a" * (choices.INLINE_TOKENIZE_BYTES + 1)}]
    asyncio.run(choices.rendered_chat(engine, big_chat))  # type: ignore[arg-type]
    assert engine.threads[0] is here
    assert engine.threads[1] is not here and engine.threads[2] is not here


def test_a_prompt_over_the_limit_is_refused_untokenized_on_every_api(
    tiny_server: BackgroundServer, client: GenerationClient
) -> None:
    over = "a" * (LIMIT + 1)
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        client.complete(over, max_tokens=2)
    assert time.monotonic() - started < REFUSED_WITHIN_S
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("prompt: ")
    assert "--max-prompt-bytes" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        client.complete(messages=[{"role": "user", "content": over}], max_tokens=2)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "--max-prompt-bytes" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        client.tokenize(over)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("text: ")

    model = tiny_server.state.served_model_name
    kserve = triton_service.ModelInferRequest(model_name=model, id="huge")
    text = kserve.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    text.contents.bytes_contents.append(over.encode())
    with grpc.insecure_channel(tiny_server.address) as channel:
        stub = triton_service_grpc.GRPCInferenceServiceStub(channel)
        started = time.monotonic()
        (answer,) = list(stub.ModelStreamInfer(iter([kserve]), timeout=30))
    assert time.monotonic() - started < REFUSED_WITHIN_S
    assert "text_input: " in answer.error_message
    assert "--max-prompt-bytes" in answer.error_message

    base = f"http://{tiny_server.http_address}/v1"
    for route, body in (
        ("completions", {"prompt": over}),
        ("chat/completions", {"messages": [{"role": "user", "content": over}]}),
    ):
        request = urllib.request.Request(
            f"{base}/{route}", data=json.dumps({"model": model, **body}).encode(),
            headers={"Content-Type": "application/json"},
        )
        started = time.monotonic()
        with pytest.raises(urllib.error.HTTPError) as http_error:
            urllib.request.urlopen(request, timeout=30)
        assert time.monotonic() - started < REFUSED_WITHIN_S
        assert http_error.value.code == 400
        assert "--max-prompt-bytes" in json.loads(http_error.value.read())["error"]["message"]


def _huge_prompt(tiny_server: BackgroundServer) -> tuple[str, float]:
    """A prompt within the limit that takes at least MIN_TOKENIZE_S to tokenize here (far
    more tokens than the tiny model's context, so the server refuses it once tokenized)."""
    engine = tiny_server.state.engine
    assert engine is not None
    text = SENTENCE * (choices.INLINE_TOKENIZE_BYTES // len(SENTENCE) + 1)
    while True:
        started = time.perf_counter()
        engine.tokenize(text)
        took = time.perf_counter() - started
        if took >= MIN_TOKENIZE_S or 2 * len(text) > LIMIT:
            return text, took
        text += text


def test_a_huge_prompt_does_not_stall_a_concurrent_stream(
    tiny_server: BackgroundServer, client: GenerationClient, slow_steps: SlowSteps
) -> None:
    huge, tokenize_s = _huge_prompt(tiny_server)
    if tokenize_s < MIN_TOKENIZE_S:
        pytest.skip(f"{len(huge)} bytes tokenize in {tokenize_s:.2f} s: too fast to tell a stall")
    arrivals: list[float] = []
    done = threading.Event()

    def read() -> None:
        with GenerationClient(tiny_server.address) as reader:
            stream = reader.generate("Keep going", max_tokens=900, ignore_eos=True)
            for _ in stream:
                arrivals.append(time.monotonic())
                if done.is_set():
                    stream.cancel()
                    return

    with slow_steps.on():
        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        while len(arrivals) < 3:
            time.sleep(0.01)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            client.complete(huge, max_tokens=2)
        ended = time.monotonic()
        time.sleep(0.1)  # a message or two after it
        done.set()
        thread.join(30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # longer than the context
    assert ended - started >= tokenize_s / 2  # it was tokenized, not refused for its size
    around = [t for t in arrivals if started - 1 <= t <= ended + 1]
    during = [t for t in around if started <= t <= ended]
    gaps = [b - a for a, b in zip(around, around[1:]) if b >= started and a <= ended]
    print(f"\nhuge prompt: {len(huge)} bytes tokenized in {tokenize_s:.2f} s; refused after "
          f"{ended - started:.2f} s; stream: {len(during)} messages meanwhile, largest gap "
          f"{max(gaps):.3f} s")
    assert len(during) >= 3
    assert max(gaps) < tokenize_s / 2


def test_the_flag_sets_the_limit() -> None:
    from pagedserve.backend.cli import add_engine_args, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_config_from_args(parser.parse_args([])).limits.max_prompt_bytes == LIMIT
    args = parser.parse_args(["--max-prompt-bytes", "10"])
    assert engine_config_from_args(args).limits.max_prompt_bytes == 10
