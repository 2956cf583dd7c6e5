"""`pagedserve generate --server` and the chat loop, against a real server."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import grpc

from pagedserve.backend.cli import EXIT_INTERRUPTED
from pagedserve.backend.server.server import BackgroundServer
from pagedserve.clients.cli import (
    RESET_NOTE,
    STOPPED_NOTE,
    TOO_LONG_HINT,
    TRIMMED_NOTE,
    chat_loop,
)
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


class _Refusal(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


TOO_LONG = _Refusal(
    grpc.StatusCode.INVALID_ARGUMENT,
    "max_tokens: prompt (900) + max_tokens (256) exceeds the model's context of 1024 tokens",
)


class _Stream:
    """A Generate stream: these text deltas, then ``then`` raised (an error, or the Ctrl-C
    that interrupts the read)."""

    def __init__(self, *texts: str, then: BaseException | None = None) -> None:
        self.texts, self.then, self.cancelled = texts, then, False

    def __iter__(self) -> Iterator[SimpleNamespace]:
        for text in self.texts:
            yield SimpleNamespace(text=text)
        if self.then is not None:
            raise self.then

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class _ScriptedClient:
    """Answers each Generate with the next stream; keeps every conversation it was sent."""

    def __init__(self, *streams: _Stream) -> None:
        self.streams = iter(streams)
        self.sent: list[list[dict[str, str]]] = []

    def generate(self, *, messages: list[dict[str, str]], **sampling: Any) -> _Stream:
        self.sent.append([dict(m) for m in messages])
        return next(self.streams)


def _chat(client: _ScriptedClient, *lines: str, system: str | None = None) -> tuple[str, str]:
    script = iter(lines)

    def read_line(prompt: str) -> str:
        try:
            return next(script)
        except StopIteration:
            raise EOFError from None

    out, notes = io.StringIO(), io.StringIO()
    assert chat_loop(client, read_line, out, system=system, notes=notes) == 0  # type: ignore[arg-type]
    return out.getvalue(), notes.getvalue()


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def test_ctrl_c_stops_the_reply_and_keeps_what_it_said() -> None:
    interrupted = _Stream("Once", " upon", then=KeyboardInterrupt())
    client = _ScriptedClient(interrupted, _Stream("ok"))
    out, notes = _chat(client, "Tell me a story", "Go on")
    assert interrupted.cancelled
    assert client.sent[1] == [user("Tell me a story"), assistant("Once upon"), user("Go on")]
    assert out == "Once upon\nok\n\n" and STOPPED_NOTE in notes


def test_the_oldest_turns_go_first_the_system_prompt_stays() -> None:
    system = {"role": "system", "content": "Be brief."}
    client = _ScriptedClient(
        _Stream("A1"), _Stream("A2"), _Stream(then=TOO_LONG), _Stream(then=TOO_LONG), _Stream("A3")
    )
    out, notes = _chat(client, "q1", "q2", "q3", system="Be brief.")
    assert client.sent[2] == [system, user("q1"), assistant("A1"), user("q2"), assistant("A2"),
                              user("q3")]
    assert client.sent[3] == [system, user("q2"), assistant("A2"), user("q3")]
    assert client.sent[4] == [system, user("q3")]
    assert notes.count(TRIMMED_NOTE) == 2 and out == "A1\nA2\nA3\n\n"


def test_a_turn_too_long_alone_is_reported_with_the_fix() -> None:
    other = _Refusal(grpc.StatusCode.INVALID_ARGUMENT, "temperature: must be >= 0")
    client = _ScriptedClient(_Stream("A1"), _Stream(then=TOO_LONG), _Stream(then=other))
    out, notes = _chat(client, "q1", "/reset", "q2", "q3")
    assert RESET_NOTE in notes
    assert client.sent[1] == [user("q2")]  # nothing older to drop after the reset
    assert "error: INVALID_ARGUMENT: max_tokens" in out and notes.count(TOO_LONG_HINT) == 1
    assert client.sent[2] == [user("q3")]  # the failed turn left the history
    assert TRIMMED_NOTE not in notes  # other refusals are not a length to trim


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_generate_with_130_and_no_traceback(tiny_server: BackgroundServer) -> None:
    command = [sys.executable, "-m", "pagedserve.backend.cli", "generate", "--server",
               tiny_server.address, "--max-tokens", "900", "--temperature", "0", "Hi"]
    # SIGINT as an interactive shell leaves it: a suite started as a background job
    # (`make test &`) runs with it ignored, which the command would inherit.
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          preexec_fn=_default_sigint) as process:
        assert process.stdout is not None and process.stdout.read(1)  # the reply has begun
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    assert process.returncode == EXIT_INTERRUPTED
    assert b"Traceback" not in err
