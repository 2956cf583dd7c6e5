"""A client that goes away aborts its engine requests: a raw socket sends a request, reads a
little (or nothing), closes, and the KV cache is free again long before the request would have
finished by itself."""

from __future__ import annotations

import json
import socket
import time

import pytest

from pagedserve.backend.server.server import BackgroundServer
from pagedserve.clients.client import GenerationClient
from tests.backend.server.harness import SlowSteps, all_blocks_free, wait_for

# With slow steps (conftest's SLOW_STEP_S), this many tokens take over ten seconds.
LONG = 500
# Freed within this: one engine step after the abort, plus the polling.
FREE_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0


def _send(server: BackgroundServer, path: str, body: dict[str, object]) -> socket.socket:
    host, port = server.http_address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=READ_TIMEOUT_S)
    payload = json.dumps(body).encode()
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload
    )
    return sock


def _read_until(sock: socket.socket, marker: bytes, count: int) -> bytes:
    """Read until ``marker`` has been seen ``count`` times (SSE events, say)."""
    seen = b""
    while seen.count(marker) < count:
        chunk = sock.recv(4096)
        assert chunk, f"the server closed the stream early: {seen!r}"
        seen += chunk
    return seen


def _running(client: GenerationClient) -> bool:
    return client.load().num_running > 0


@pytest.mark.parametrize(
    ("path", "n"),
    [("/v1/completions", 1), ("/v1/chat/completions", 1), ("/v1/completions", 3)],
)
def test_closing_a_stream_mid_way_frees_its_blocks(
    tiny_server: BackgroundServer, slow_steps: SlowSteps, client: GenerationClient,
    path: str, n: int,
) -> None:
    body: dict[str, object] = {
        "model": tiny_server.state.served_model_name,
        "max_tokens": LONG,
        "ignore_eos": True,
        "stream": True,
        "n": n,
    }
    if "chat" in path:
        body["messages"] = [{"role": "user", "content": "Talk for a long time."}]
    else:
        body["prompt"] = "Once upon a time"
    wait_for(lambda: all_blocks_free(client), FREE_TIMEOUT_S, "a free cache before the test")
    with slow_steps.on():
        sock = _send(tiny_server, path, body)
        try:
            head = _read_until(sock, b"\n\n", 3 * n)  # a few events of every choice
            assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
            assert client.load().num_running == n
        finally:
            sock.close()
        closed = time.monotonic()
        wait_for(lambda: all_blocks_free(client), FREE_TIMEOUT_S, "KV blocks freed")
    assert time.monotonic() - closed < FREE_TIMEOUT_S


def test_closing_before_a_whole_response_frees_its_blocks(
    tiny_server: BackgroundServer, slow_steps: SlowSteps, client: GenerationClient
) -> None:
    body = {
        "model": tiny_server.state.served_model_name,
        "prompt": "Once upon a time",
        "max_tokens": LONG,
        "ignore_eos": True,
        "n": 2,
    }
    wait_for(lambda: all_blocks_free(client), FREE_TIMEOUT_S, "a free cache before the test")
    with slow_steps.on():
        sock = _send(tiny_server, "/v1/completions", body)
        try:
            wait_for(lambda: _running(client), FREE_TIMEOUT_S, "the request to run")
        finally:
            sock.close()
        wait_for(lambda: all_blocks_free(client), FREE_TIMEOUT_S, "KV blocks freed")
