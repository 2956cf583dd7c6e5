"""`pagedserve generate --server` and the chat loop, against a real server."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Iterator

from pagedserve.backend.server.server import BackgroundServer
from pagedserve.clients.cli import chat_loop
from pagedserve.clients.client import GenerationClient


def test_generate_server_streams_the_chat_answer(tiny_server: BackgroundServer) -> None:
    prompt = "What is paged attention?"
    with GenerationClient(tiny_server.address) as client:
        expected = client.complete(
            messages=[{"role": "user", "content": prompt}], max_tokens=12, temperature=0.0
        ).text
        raw = client.complete(prompt, max_tokens=12, temperature=0.0).text
    command = [sys.executable, "-m", "pagedserve.backend.cli", "generate", "--server",
               tiny_server.address, "--max-tokens", "12", "--temperature", "0"]
    chat = subprocess.run([*command, prompt], capture_output=True, text=True, timeout=60)
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout == expected + "\n"
    plain = subprocess.run([*command, "--raw", prompt], capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == raw + "\n"


def test_generate_server_reports_a_bad_request(tiny_server: BackgroundServer) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pagedserve.backend.cli", "generate", "--server",
         tiny_server.address, "--max-tokens", "0", "hi"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr and "max_tokens" in result.stderr


def _lines(*lines: str) -> Iterator[str]:
    yield from lines


def test_chat_loop_keeps_history_and_resets(tiny_server: BackgroundServer) -> None:
    sampling = {"max_tokens": 6, "temperature": 0.0}
    script = _lines("Hello", "", "And then?", "/reset", "And then?", "/exit", "never read")

    def read_line(prompt: str) -> str:
        return next(script)

    out = io.StringIO()
    with GenerationClient(tiny_server.address) as client:
        assert chat_loop(client, read_line, out, system="Be brief.", sampling=sampling) == 0
        system = {"role": "system", "content": "Be brief."}
        first = client.complete(
            messages=[system, {"role": "user", "content": "Hello"}], **sampling
        ).text
        second = client.complete(
            messages=[
                system,
                {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": first},
                {"role": "user", "content": "And then?"},
            ],
            **sampling,
        ).text
        after_reset = client.complete(
            messages=[system, {"role": "user", "content": "And then?"}], **sampling
        ).text
    assert out.getvalue() == f"{first}\n{second}\n{after_reset}\n"
    assert next(script) == "never read"


def test_chat_loop_reports_errors_and_ends_at_eof(tiny_server: BackgroundServer) -> None:
    script = _lines("Hi")

    def read_line(prompt: str) -> str:
        try:
            return next(script)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    with GenerationClient(tiny_server.address) as client:
        assert chat_loop(client, read_line, out, sampling={"max_tokens": 0}) == 0
    assert "error: INVALID_ARGUMENT: max_tokens" in out.getvalue()
