"""The drain with an HTTP stream open: SIGTERM to a ``pagedserve serve`` process while a
streamed completion runs over the OpenAI API.

As on gRPC (test_drain.py): the open stream runs to its end (every token, its usage, then
``data: [DONE]``), new work is refused while the process still drains, and it exits 0 once
the stream is done. On HTTP a refusal is one of three: the listener is closed at the drain's
start, so a new connection is refused (or reset unanswered, if the kernel had queued it
already); a request that reached the server first gets the documented 503 in OpenAI's error
shape. Never a 200.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.backend.server.serve_process import ServeProcess, serving

STEP_DELAY_S = 0.02
DRAIN_TIMEOUT_S = 60.0
# At STEP_DELAY_S per token, about 2 s: still running when the refusals are checked.
MAX_TOKENS = 100
PROMPT = "The stream that the drain must let finish"
CALL_TIMEOUT_S = 120.0
LOG_TIMEOUT_S = 10.0
DRAINING = "draining: in-flight requests get up to"


def _free_port() -> int:
    """A port free a moment ago (``--http-port 0`` turns the HTTP API off, not ephemeral)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def drain_server(tiny_llama_dir: Path, tmp_path: Path) -> Iterator[tuple[ServeProcess, str]]:
    """A SERVING replica and its HTTP API's base URL."""
    port = _free_port()
    with serving(
        [tiny_llama_dir], tmp_path, step_delay_s=STEP_DELAY_S, drain_timeout_s=DRAIN_TIMEOUT_S,
        extra_flags=["--http-port", str(port)],
    ) as (server,):
        yield server, f"http://127.0.0.1:{port}"


def _wait_in_log(server: ServeProcess, text: str) -> None:
    deadline = time.monotonic() + LOG_TIMEOUT_S
    while text not in server.log_text():
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} never in the log:\n{server.log_text()}")
        time.sleep(STEP_DELAY_S)


def _body(model: str, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0.0,
        "ignore_eos": True, "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def _new_request_outcome(url: str, model: str) -> str:
    """What a new client gets: 'refused', or the status and error type of the answer."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as fresh:
        try:
            async with fresh.post(url, json={**_body(model, False), "max_tokens": 2}) as reply:
                error = (await reply.json()).get("error") or {}
                return f"{reply.status} {error.get('type')}"
        # Refused outright, or reset unanswered: a connection the kernel had queued before the
        # listener closed (ClientConnectorError is one of the OS errors).
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
            return "refused"


async def test_sigterm_lets_an_http_stream_finish_and_refuses_new_requests(
    drain_server: tuple[ServeProcess, str],
) -> None:
    server, base = drain_server
    url = f"{base}/v1/completions"
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(f"{base}/v1/models") as reply:
            model = (await reply.json())["data"][0]["id"]
        async with session.post(url, json=_body(model, False)) as reply:
            assert reply.status == 200
            expected = (await reply.json())["choices"][0]["text"]

        async with session.post(url, json=_body(model, True)) as stream:
            assert stream.status == 200
            assert stream.headers["Content-Type"].startswith("text/event-stream")
            events = [await stream.content.readline()]
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(_wait_in_log, server, DRAINING)

            # Refused while the process still drains, never served.
            outcome = await _new_request_outcome(url, model)
            assert outcome in ("refused", "503 server_error"), outcome
            deadline = time.monotonic() + LOG_TIMEOUT_S
            while outcome != "refused":  # a 503 came first: the listener closes right after
                assert time.monotonic() < deadline, "the HTTP listener stayed open"
                await asyncio.sleep(STEP_DELAY_S)
                outcome = await _new_request_outcome(url, model)
                assert outcome in ("refused", "503 server_error"), outcome
            assert server.running(), "the process left before its stream finished"
            assert not stream.content.at_eof(), "the stream ended before the refusals were checked"

            events += [line async for line in stream.content]
    exit_code = await asyncio.to_thread(server.wait_exit, CALL_TIMEOUT_S)
    drained_in = time.monotonic() - signalled

    assert exit_code == 0, server.log_text()
    data = [line.decode() for line in events if line.strip()]
    assert all(line.startswith("data: ") for line in data), data
    assert data[-1] == "data: [DONE]\n"
    chunks = [json.loads(line[len("data: "):]) for line in data[:-1]]
    assert not any("error" in chunk for chunk in chunks), chunks
    *tokens, usage = chunks
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == MAX_TOKENS
    assert "".join(c["choices"][0]["text"] for c in tokens) == expected
    assert tokens[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in tokens[:-1])
    # The process left once the stream was done, not at the 60 s deadline.
    assert drained_in < 30.0, f"drain took {drained_in:.1f} s"
