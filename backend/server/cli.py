"""``pagedserve serve``: the gRPC server on the engine flags plus the edge's own."""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import TYPE_CHECKING

from pagedserve.backend.config import ServerConfig
from pagedserve.backend.telemetry.cli import add_telemetry_args, telemetry_config_from_args

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]


def add_server_args(parser: argparse.ArgumentParser) -> None:
    defaults = ServerConfig()
    group = parser.add_argument_group("server")
    group.add_argument("--host", default=defaults.host, help="address to listen on")
    group.add_argument("--port", type=int, default=defaults.port, help="0 picks a free port")
    group.add_argument(
        "--drain-timeout",
        dest="drain_timeout_s",
        type=float,
        default=defaults.drain_timeout_s,
        help="seconds in-flight requests get to finish after SIGTERM",
    )
    group.add_argument(
        "--max-message-bytes", type=int, default=defaults.max_message_bytes
    )
    group.add_argument(
        "--warmup", action=argparse.BooleanOptionalAction, default=defaults.warmup
    )
    group.add_argument(
        "--stream-interval",
        type=_positive_int,
        default=defaults.stream_interval,
        help="tokens in each streamed message after the first (the last may have fewer); "
        "higher trades smoothness for throughput under many streams",
    )
    group.add_argument(
        "--engine-process",
        action=argparse.BooleanOptionalAction,
        default=defaults.engine_process,
        help="run the engine loop in a process of its own (default: on with CUDA, off on CPU)",
    )
    add_telemetry_args(parser)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        host=args.host,
        port=args.port,
        drain_timeout_s=args.drain_timeout_s,
        max_message_bytes=args.max_message_bytes,
        warmup=args.warmup,
        stream_interval=args.stream_interval,
        engine_process=args.engine_process,
        telemetry=telemetry_config_from_args(args),
    )


def serve(args: argparse.Namespace) -> int:
    """Entry point of ``pagedserve serve``; returns the process exit code."""
    from pagedserve.backend.cli import engine_config_from_args
    from pagedserve.backend.server.server import run_server

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    return asyncio.run(run_server(server_config_from_args(args), engine_config_from_args(args)))


def register_serve(sub: SubParsers) -> None:
    from pagedserve.backend.cli import add_engine_args

    parser = sub.add_parser(
        "serve",
        help="serve the model over gRPC",
        description="Serve pagedserve.v1.GenerationService, health and reflection on one port.",
    )
    add_server_args(parser)
    add_engine_args(parser)
    parser.set_defaults(func=serve)
