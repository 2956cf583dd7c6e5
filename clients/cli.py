"""Terminal clients: ``pagedserve generate --server HOST:PORT`` and ``pagedserve chat``.

Both stream text as it arrives. They talk gRPC only, so they start fast and need no torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, TextIO

import grpc

from pagedserve.clients.client import GenerationClient
from pagedserve.clients.security import add_connection_args, connection_from_args

DEFAULT_SERVER = "127.0.0.1:8001"
EXIT_COMMANDS = frozenset({"/exit", "/quit"})
RESET_COMMAND = "/reset"


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
    """The request fields from the shared sampling flags (offline_cli.add_sampling_args)."""
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


def chat_loop(
    client: GenerationClient,
    read_line: Callable[[str], str],
    out: TextIO,
    *,
    system: str | None = None,
    sampling: dict[str, Any] | None = None,
) -> int:
    """Read a user turn, stream the reply, keep the history. Ends at EOF or /exit;
    /reset forgets the conversation. A failed turn is reported and dropped from the history."""
    base = [{"role": "system", "content": system}] if system else []
    history = list(base)
    while True:
        try:
            line = read_line("> ")
        except EOFError:
            out.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in EXIT_COMMANDS:
            return 0
        if text == RESET_COMMAND:
            history = list(base)
            continue
        history.append({"role": "user", "content": text})
        try:
            reply = stream_to(out, client.generate(messages=history, **(sampling or {})))
        except grpc.RpcError as error:
            out.write("\n")
            _fail(error, out)
            history.pop()
            continue
        out.write("\n")
        history.append({"role": "assistant", "content": reply})


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
        print(f"chatting with {args.server} ({model_name}); "
              f"{RESET_COMMAND} starts over, /exit or Ctrl-D ends", file=sys.stderr)
        return chat_loop(
            client, input, sys.stdout, system=args.system, sampling=_sampling(args)
        )


def register_chat(sub: Any) -> None:
    p = sub.add_parser("chat", help="interactive chat with a running pagedserve server")
    p.add_argument("--server", default=DEFAULT_SERVER, metavar="HOST:PORT")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--wait", type=float, default=300.0, help="seconds to wait for the server")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    add_connection_args(p)
    p.set_defaults(func=run_chat)
