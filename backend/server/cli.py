"""``pagedserve serve``: the gRPC server and the HTTP API on the engine flags plus the edge's
own."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from dataclasses import replace
from typing import TYPE_CHECKING

from pagedserve.backend.config import ServerConfig
from pagedserve.backend.errors import PagedServeError
from pagedserve.backend.server.security import (
    API_KEY_ENV,
    SecurityConfigError,
    resolve_api_key,
    validate,
)
from pagedserve.backend.telemetry.cli import add_telemetry_args, telemetry_config_from_args

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# A configuration that cannot work, as argparse exits for a bad flag.
CONFIG_ERROR_EXIT = 2
_MAX_PORT = 65535

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]


def add_server_args(parser: argparse.ArgumentParser) -> None:
    defaults = ServerConfig()
    group = parser.add_argument_group("server")
    group.add_argument(
        "--host", default=defaults.host,
        help="address the gRPC and HTTP ports listen on (0.0.0.0: every interface; "
        "127.0.0.1 keeps them to this machine)",
    )
    group.add_argument(
        "--port", type=int, default=defaults.port, help="the gRPC port; 0 picks a free port"
    )
    group.add_argument(
        "--http-port", type=_http_port, default=defaults.http_port,
        help="the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
        "/v1/models, /health); 0 turns it off",
    )
    group.add_argument(
        "--drain-timeout",
        dest="drain_timeout_s",
        type=float,
        default=defaults.drain_timeout_s,
        help="seconds in-flight requests get to finish after SIGTERM",
    )
    group.add_argument(
        "--max-message-bytes", type=int, default=defaults.max_message_bytes,
        help="largest request or response message (a larger request: RESOURCE_EXHAUSTED)",
    )
    group.add_argument(
        "--max-concurrent-streams", type=_positive_int, default=defaults.max_concurrent_streams,
        help="calls one connection may have open at once; more wait for a free one",
    )
    group.add_argument(
        "--warmup", action=argparse.BooleanOptionalAction, default=defaults.warmup,
        help="run one short generation through the whole path before health says SERVING",
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
    group.add_argument(
        "--exit-on-load-error",
        action=argparse.BooleanOptionalAction,
        default=defaults.exit_on_load_error,
        help="end the server (exit code 1) when the model fails to load; with "
        "--no-exit-on-load-error it keeps listening, health NOT_SERVING, calls UNAVAILABLE",
    )
    group.add_argument(
        "--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="DEBUG also logs the traceback of a failure",
    )
    add_telemetry_args(parser)
    add_security_args(parser)


def add_security_args(parser: argparse.ArgumentParser) -> None:
    """TLS, mTLS and the API key (backend/server/security.py)."""
    group = parser.add_argument_group(
        "security",
        "TLS on the gRPC and HTTP ports with --ssl-certfile and --ssl-keyfile; mTLS with "
        f"--ssl-ca-certs too. An API key (--api-key, --api-key-file or ${API_KEY_ENV}) makes "
        "every RPC but health and reflection require metadata 'authorization: Bearer <key>' "
        "(UNAUTHENTICATED otherwise), and every HTTP request but /health the header "
        "'Authorization: Bearer <key>' (401 otherwise). A bad file or combination fails the "
        "start with one error line.",
    )
    group.add_argument(
        "--ssl-certfile", metavar="PEM", help="the server's certificate chain (TLS)"
    )
    group.add_argument("--ssl-keyfile", metavar="PEM", help="its private key, unencrypted")
    group.add_argument(
        "--ssl-ca-certs", metavar="PEM",
        help="CA certificates; clients must present a certificate signed by one (mTLS)",
    )
    group.add_argument(
        "--api-key", default=None,
        help=f"the key clients must send; visible in `ps`: prefer ${API_KEY_ENV} or "
        "--api-key-file",
    )
    group.add_argument(
        "--api-key-file", metavar="PATH", default=None,
        help="read the key from this file (a mounted secret; surrounding whitespace dropped)",
    )
    group.add_argument(
        "--metrics-ssl", action=argparse.BooleanOptionalAction, default=False,
        help="serve metrics over HTTPS with the gRPC port's --ssl-certfile/--ssl-keyfile "
        "(and --ssl-ca-certs: scrapers then need a client certificate too). The same files, "
        "not separate ones: the server has one identity, one certificate to rotate, and "
        "scrapers trust the CA clients trust. Off by default: Prometheus scrapes plain HTTP "
        "unless told otherwise, and in a mesh the sidecar encrypts the scrape",
    )
    group.add_argument(
        "--metrics-require-api-key", action=argparse.BooleanOptionalAction, default=False,
        help="the metrics endpoint asks for 'Authorization: Bearer <key>' too (HTTP 401 "
        "otherwise). Off by default, so scrapers need no secret",
    )


def _http_port(text: str) -> int | None:
    """0 is "off" here (a free port is for tests, through ServerConfig)."""
    value = int(text)
    if not 0 <= value <= _MAX_PORT:
        raise argparse.ArgumentTypeError(f"must be a port number, got {value}")
    return value or None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The config the flags ask for; SecurityConfigError when the security flags conflict or
    the key file cannot be read (the files themselves are checked by ``security.validate``)."""
    config = ServerConfig(
        host=args.host,
        port=args.port,
        http_port=args.http_port,
        drain_timeout_s=args.drain_timeout_s,
        max_message_bytes=args.max_message_bytes,
        max_concurrent_streams=args.max_concurrent_streams,
        warmup=args.warmup,
        stream_interval=args.stream_interval,
        engine_process=args.engine_process,
        exit_on_load_error=args.exit_on_load_error,
        telemetry=telemetry_config_from_args(args),
    )
    return with_security_args(config, args)


def with_security_args(config: ServerConfig, args: argparse.Namespace) -> ServerConfig:
    api_key = resolve_api_key(args.api_key, args.api_key_file, os.environ)
    telemetry = config.telemetry
    if args.metrics_ssl:
        if args.ssl_certfile is None or args.ssl_keyfile is None:
            raise SecurityConfigError("--metrics-ssl needs --ssl-certfile and --ssl-keyfile")
        telemetry = replace(
            telemetry,
            metrics_ssl_certfile=args.ssl_certfile,
            metrics_ssl_keyfile=args.ssl_keyfile,
            metrics_ssl_ca_certs=args.ssl_ca_certs,
        )
    if args.metrics_require_api_key:
        if api_key is None:
            raise SecurityConfigError(
                f"--metrics-require-api-key needs --api-key, --api-key-file or ${API_KEY_ENV}"
            )
        telemetry = replace(telemetry, metrics_api_key=api_key)
    return replace(
        config,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        ssl_ca_certs=args.ssl_ca_certs,
        api_key=api_key,
        telemetry=telemetry,
    )


def serve(args: argparse.Namespace) -> int:
    """Entry point of ``pagedserve serve``; returns the process exit code. A start-up error
    (a busy port, an unreadable setting) is one line on stderr and exit code 1; the traceback
    is logged at debug level (``--log-level DEBUG``)."""
    from pagedserve.backend.cli import engine_config_from_args
    from pagedserve.backend.server.server import run_server

    try:
        config = server_config_from_args(args)
        validate(config)  # before the model loads, or anything is bound
    except SecurityConfigError as error:
        print(f"pagedserve serve: error: {error}", file=sys.stderr)
        return CONFIG_ERROR_EXIT
    logging.basicConfig(level=args.log_level, format=LOG_FORMAT)
    try:
        return asyncio.run(run_server(config, engine_config_from_args(args)))
    except (OSError, ValueError, PagedServeError) as error:
        logging.getLogger(__name__).debug("start-up failed", exc_info=error)
        print(f"pagedserve serve: {error}", file=sys.stderr)
        return 1


def register_serve(sub: SubParsers) -> None:
    from pagedserve.backend.cli import add_engine_args

    parser = sub.add_parser(
        "serve",
        help="serve the model over gRPC and the OpenAI-compatible HTTP API",
        description="Serve pagedserve.v1.GenerationService, KServe v2, health and reflection on "
        "the gRPC port, and the OpenAI-compatible API on the HTTP port.",
    )
    add_server_args(parser)
    add_engine_args(parser)
    parser.set_defaults(func=serve)
