"""`pagedserve chat` in a pseudo-terminal against a real server: what a user types (long turns,
Ctrl-C, /reset) and what they see."""

from __future__ import annotations

import os
import pty
import select
import signal
import sys
import time
from collections.abc import Iterator

import pytest

from pagedserve.backend.server.server import BackgroundServer
from pagedserve.clients.cli import (
    INTERRUPT_AT_PROMPT_NOTE,
    RESET_NOTE,
    STOPPED_NOTE,
    TRIMMED_NOTE,
)
from pagedserve.clients.client import GenerationClient

EXPECT_TIMEOUT_S = 60.0
PROMPT = "\n> "  # the prompt at the start of a line
CTRL_C = "\x03"


class Terminal:
    """A command on a pseudo-terminal that is its controlling terminal, so Ctrl-C is the
    terminal's SIGINT to it, as in a shell."""

    def __init__(self, *args: str) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child: become the command at once
            env = {**os.environ, "TERM": "dumb"}
            # Ctrl-C as an interactive shell leaves it: a suite started as a background job
            # (`make test &`) runs with SIGINT ignored, which every child would inherit.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execve(sys.executable, [sys.executable, "-m", "pagedserve.backend.cli", *args], env)
        self.pid, self.fd = pid, fd
        self.unread = ""
        self.ended = False

    def expect(self, text: str, timeout_s: float = EXPECT_TIMEOUT_S) -> str:
        """Read until ``text`` shows; return what came before it (the line endings as
        written, the terminal's \\r dropped)."""
        deadline = time.monotonic() + timeout_s
        while text not in self.unread:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise AssertionError(f"never saw {text!r}; the terminal shows {self.unread!r}")
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # the command ended and closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"ended before {text!r}; the terminal shows {self.unread!r}")
            self.unread += chunk.decode(errors="replace").replace("\r", "")
        before, _, self.unread = self.unread.partition(text)
        return before

    def wait_for_output(self, timeout_s: float = EXPECT_TIMEOUT_S) -> None:
        if not self.unread:
            assert select.select([self.fd], [], [], timeout_s)[0], "no output"
            self.unread += os.read(self.fd, 65536).decode(errors="replace").replace("\r", "")

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def exit_code(self, timeout_s: float = EXPECT_TIMEOUT_S) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.ended = True
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        raise AssertionError("the command did not end")

    def kill(self) -> None:
        """End a command a failed test left running."""
        if not self.ended:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            os.close(self.fd)


@pytest.fixture
def terminals() -> Iterator[list[Terminal]]:
    started: list[Terminal] = []
    yield started
    for terminal in started:
        terminal.kill()


def _chat(terminals: list[Terminal], server: BackgroundServer, *flags: str) -> Terminal:
    terminal = Terminal("chat", "--server", server.address, "--temperature", "0", *flags)
    terminals.append(terminal)
    terminal.expect("chatting with")
    terminal.expect("> ")
    return terminal


def _message_of(client: GenerationClient, num_tokens: int) -> str:
    """A user turn of about ``num_tokens`` tokens."""
    unit = "pages of attention "
    per_unit = len(client.tokenize(unit * 64, add_special_tokens=False)) / 64
    return (unit * round(num_tokens / per_unit)).strip()


def test_the_history_is_cut_to_the_context_oldest_turn_first(
    tiny_server: BackgroundServer, terminals: list[Terminal]
) -> None:
    with GenerationClient(tiny_server.address) as client:
        context = client.model_info().context_length
        # Each turn fits alone with its reply; two do not.
        first, second = (_message_of(client, int(context * 0.55)) for _ in range(2))
    chat = _chat(terminals, tiny_server, "--max-tokens", "8")
    chat.type(first + "\n")
    assert TRIMMED_NOTE not in chat.expect(PROMPT)
    chat.type(second + "\n")
    shown = chat.expect(PROMPT)
    assert TRIMMED_NOTE in shown and "error" not in shown
    chat.type("/exit\n")
    assert chat.exit_code() == 0


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(
    tiny_server: BackgroundServer, terminals: list[Terminal]
) -> None:
    chat = _chat(terminals, tiny_server, "--max-tokens", "900")
    chat.type("Tell me a long story\n")
    chat.expect("Tell me a long story\n")  # the terminal's echo of the line
    chat.wait_for_output()  # the reply has begun
    chat.type(CTRL_C)
    assert "error" not in chat.expect(STOPPED_NOTE)
    chat.expect("> ")
    chat.type(CTRL_C)  # at the prompt: the line is cleared, the chat stays
    chat.expect(INTERRUPT_AT_PROMPT_NOTE)
    chat.expect("> ")
    chat.type("/reset\n")
    chat.expect(RESET_NOTE)
    chat.expect("> ")
    chat.type("/exit\n")
    assert chat.exit_code() == 0
