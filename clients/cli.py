"""Terminal clients: ``pagedserve generate --server HOST:PORT`` and ``pagedserve chat``.

Both stream text as it arrives. They talk gRPC only, so they start fast and need no torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, TextIO

import grpc

from pagedserve.backend.sampling_params import SamplingParams
from pagedserve.clients.client import GenerationClient
from pagedserve.clients.security import add_connection_args, connection_from_args

DEFAULT_SERVER = "127.0.0.1:8001"
# A reply's budget: long enough for an answer, short enough to leave the history room.
CHAT_MAX_TOKENS = 256
EXIT_COMMANDS = frozenset({"/exit", "/quit"})
RESET_COMMAND = "/reset"
PROMPT = "> "
RESET_NOTE = "(conversation reset)"
STOPPED_NOTE = "(reply stopped; the conversation goes on)"
TRIMMED_NOTE = "(dropped the oldest turn: the conversation no longer fit the model's context)"
TOO_LONG_HINT = "(this message alone does not fit: shorten it or lower --max-tokens)"
INTERRUPT_AT_PROMPT_NOTE = "(Ctrl-D or /exit ends the chat)"
# How the engine's admission words a request too long for the context, the cache or the
# server's prompt limit (backend/engine/request.py).
_CONTEXT_MARKERS = ("the model's context", "KV blocks", "--max-prompt-tokens")


def _fail(error: grpc.RpcError, err: TextIO) -> int:
    code = error.code()
    print(f"error: {code.name if code else 'UNKNOWN'}: {error.details()}", file=err)
    return 1


def stream_to(out: TextIO, responses: Any) -> str:
    """Write each text delta as it arrives; return the whole text."""
    pieces: list[str] = []
    for response in responses:
        if response.text:
            out.write(response.text)
            out.flush()
            pieces.append(response.text)
    return "".join(pieces)


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    """The request fields from the shared sampling flags (``add_sampling_args``)."""
    return {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.sampling_seed,
    }


def connect(args: argparse.Namespace) -> GenerationClient:
    """A client for ``--server`` with the connection flags (ValueError: unusable flags)."""
    return GenerationClient(args.server, **connection_from_args(args))


def run_generate_remote(
    args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    """``pagedserve generate --server``: one prompt, as a chat message unless ``--raw``."""
    try:
        client = connect(args)
    except ValueError as error:
        print(f"error: {error}", file=err)
        return 2
    with client:
        if args.raw:
            responses = client.generate(args.prompt, **_sampling(args))
        else:
            messages = [{"role": "user", "content": args.prompt}]
            responses = client.generate(messages=messages, **_sampling(args))
        try:
            stream_to(out, responses)
        except grpc.RpcError as error:
            out.write("\n")
            return _fail(error, err)
    out.write("\n")
    return 0


def _context_exceeded(error: grpc.RpcError) -> bool:
    """Whether the server refused the request for its length: what dropping older turns
    mends. Worded by the engine's admission (``RequestBuilder``), the one place it is checked."""
    details = error.details() or ""
    return error.code() == grpc.StatusCode.INVALID_ARGUMENT and any(
        marker in details for marker in _CONTEXT_MARKERS
    )


def _drop_oldest_exchange(history: list[dict[str, str]], keep: int) -> None:
    """Remove the first user turn after ``keep`` messages and the replies that follow it."""
    del history[keep]
    while len(history) > keep + 1 and history[keep]["role"] != "user":
        del history[keep]


def _stream_reply(
    client: GenerationClient,
    history: list[dict[str, str]],
    keep: int,
    sampling: dict[str, Any],
    out: TextIO,
    notes: TextIO,
) -> str | None:
    """Stream the reply to ``history``, dropping its oldest turns (never the first ``keep``
    messages, nor the last one) while it is too long for the model. Ctrl-C stops the reply and
    returns what came so far; None when the turn failed."""
    while True:
        # The call itself, not just an iterator: cancel() ends the request on the server.
        responses: Any = client.generate(messages=history, **sampling)
        pieces: list[str] = []
        try:
            for response in responses:
                if response.text:
                    out.write(response.text)
                    out.flush()
                    pieces.append(response.text)
        except KeyboardInterrupt:
            responses.cancel()
            out.write("\n")
            print(STOPPED_NOTE, file=notes)
            return "".join(pieces)
        except grpc.RpcError as error:
            if not pieces and _context_exceeded(error) and len(history) > keep + 1:
                _drop_oldest_exchange(history, keep)
                print(TRIMMED_NOTE, file=notes)
                continue
            if pieces:
                out.write("\n")
            _fail(error, out)
            if _context_exceeded(error):
                print(TOO_LONG_HINT, file=notes)
            return None
        out.write("\n")
        return "".join(pieces)


def chat_loop(
    client: GenerationClient,
    read_line: Callable[[str], str],
    out: TextIO,
    *,
    system: str | None = None,
    sampling: dict[str, Any] | None = None,
    notes: TextIO | None = None,
) -> int:
    """Read a user turn, stream the reply, keep the history. Ends at EOF or /exit; /reset
    forgets the conversation. Replies go to ``out``, notes (reset, trimmed, stopped) to
    ``notes`` (stderr by default), so that ``out`` holds the conversation alone.

    The history is cut to the model's context, oldest turns first (the system prompt stays).
    Ctrl-C during a reply stops it and keeps what it said; at the prompt it clears the line. A
    failed turn is reported and dropped from the history."""
    notes = notes if notes is not None else sys.stderr
    base = [{"role": "system", "content": system}] if system else []
    history = list(base)
    while True:
        try:
            line = read_line(PROMPT)
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\n")
            print(INTERRUPT_AT_PROMPT_NOTE, file=notes)
            continue
        text = line.strip()
        if not text:
            continue
        if text in EXIT_COMMANDS:
            return 0
        if text == RESET_COMMAND:
            history = list(base)
            print(RESET_NOTE, file=notes)
            continue
        history.append({"role": "user", "content": text})
        reply = _stream_reply(client, history, len(base), sampling or {}, out, notes)
        if reply:
            history.append({"role": "assistant", "content": reply})
        else:  # failed, or stopped before a word: the turn never happened
            history.pop()


def _enable_line_editing() -> None:
    """Arrow keys, history and Ctrl-A/E for ``input()``; not every platform has readline."""
    try:
        import readline  # noqa: F401  (importing it is what switches input() over)
    except ImportError:
        pass


def run_chat(args: argparse.Namespace) -> int:
    try:
        client = connect(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    with client:
        try:
            client.wait_until_serving(args.wait)
            model_name = client.model_info().model_name
        except TimeoutError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        except grpc.RpcError as error:
            return _fail(error, sys.stderr)
        _enable_line_editing()
        print(f"chatting with {args.server} ({model_name}); {RESET_COMMAND} starts over, "
              "/exit or Ctrl-D ends, Ctrl-C stops a reply", file=sys.stderr)
        return chat_loop(
            client, input, sys.stdout, system=args.system, sampling=_sampling(args)
        )


def add_sampling_args(parser: argparse.ArgumentParser, *, max_tokens: int) -> None:
    """The sampling flags of ``generate`` and ``chat``, their defaults those of every front
    (``backend/sampling_params.py``) but for the command's own ``max_tokens``."""
    defaults = SamplingParams()
    group = parser.add_argument_group("sampling")
    group.add_argument(
        "--max-tokens", type=int, default=max_tokens,
        help="most tokens in a reply (it ends earlier at the model's end of text)",
    )
    group.add_argument(
        "--temperature", type=float, default=defaults.temperature,
        help="randomness of sampling; 0 is greedy (the same answer every time), 1 the model's "
        "own distribution",
    )
    group.add_argument(
        "--top-p", type=float, default=defaults.top_p,
        help="sample from the smallest set of tokens this likely; 1 turns it off",
    )
    group.add_argument(
        "--top-k", type=int, default=defaults.top_k,
        help="sample from the k likeliest tokens; -1 turns it off",
    )
    group.add_argument(
        "--sampling-seed", type=int, default=defaults.seed,
        help="seed of each request's sampling, for reproducible answers (default: random)",
    )


def register_chat(sub: Any) -> None:
    p = sub.add_parser(
        "chat", help="interactive chat with a running pagedserve server",
        description="Chat with a running server over gRPC. /reset starts over, /exit or Ctrl-D "
        "ends, Ctrl-C stops a reply and keeps the conversation; the oldest turns are dropped "
        "once the conversation no longer fits the model's context.",
    )
    p.add_argument(
        "--server", default=DEFAULT_SERVER, metavar="HOST:PORT", help="the server's gRPC address"
    )
    p.add_argument("--system", default=None, help="system prompt, kept through every trim")
    p.add_argument("--wait", type=float, default=300.0, help="seconds to wait for the server")
    add_sampling_args(p, max_tokens=CHAT_MAX_TOKENS)
    p.add_argument(
        "--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="DEBUG also logs the traceback of a failure",
    )
    add_connection_args(p)
    p.set_defaults(func=run_chat)
