"""How a client reaches a secured server: TLS, a client certificate (mTLS), an API key.

``ChannelSecurity`` builds the channel ``GenerationClient`` and ``AsyncGenerationClient`` use:
TLS credentials from PEM files (or gRPC's default roots), a server-name override for a
certificate issued to another name than the address dialled, and the API key sent as metadata
``authorization: Bearer <key>`` on every call, by a channel interceptor, so calls made through
``client.stub`` carry it too. A key also travels over plaintext: behind a mesh sidecar that
does the TLS, that is the intended set-up.

``add_connection_args`` / ``connection_from_args`` give the terminal clients (generate, chat,
bench serve) the same flags.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import grpc

API_KEY_ENV = "PAGEDSERVE_API_KEY"
SERVER_NAME_OPTION = "grpc.ssl_target_name_override"


@dataclass(frozen=True)
class ChannelSecurity:
    """TLS and the API key of one client; files are read when the channel is made.

    ``ssl=None`` turns TLS on when any ``ssl_*`` file is given; ``ssl=True`` without a CA file
    verifies the server against gRPC's default roots.
    """

    ssl: bool | None = None
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_server_name: str | None = None
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("a client certificate needs both ssl_certfile and ssl_keyfile")
        if self.ssl is False and self.tls_files:
            raise ValueError("ssl=False with TLS files: drop the files or the ssl=False")
        if self.ssl_server_name is not None and not self.tls:
            raise ValueError("ssl_server_name applies to TLS connections only")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key is empty")

    @property
    def tls_files(self) -> bool:
        return any(f is not None for f in (self.ssl_ca_certs, self.ssl_certfile, self.ssl_keyfile))

    @property
    def tls(self) -> bool:
        return bool(self.ssl) or self.tls_files

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ssl_ca_certs, "ssl_ca_certs"),
            private_key=_read(self.ssl_keyfile, "ssl_keyfile"),
            certificate_chain=_read(self.ssl_certfile, "ssl_certfile"),
        )

    def options(self) -> list[tuple[str, Any]]:
        if self.ssl_server_name is None:
            return []
        return [(SERVER_NAME_OPTION, self.ssl_server_name)]

    def metadata(self) -> tuple[tuple[str, str], ...]:
        if self.api_key is None:
            return ()
        return (("authorization", f"Bearer {self.api_key}"),)

    def channel(self, target: str, options: Iterable[tuple[str, Any]]) -> grpc.Channel:
        options = [*options, *self.options()]
        channel = (
            grpc.secure_channel(target, self.credentials(), options=options)
            if self.tls
            else grpc.insecure_channel(target, options=options)
        )
        metadata = self.metadata()
        return grpc.intercept_channel(channel, _AddMetadata(metadata)) if metadata else channel

    def aio_channel(self, target: str, options: Iterable[tuple[str, Any]]) -> grpc.aio.Channel:
        options = [*options, *self.options()]
        metadata = self.metadata()
        interceptors = _aio_interceptors(metadata) if metadata else None
        if self.tls:
            return grpc.aio.secure_channel(
                target, self.credentials(), options=options, interceptors=interceptors
            )
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)


def _read(path: str | None, name: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read {name} {path}: {error.strerror or error}") from None


def _merged(
    metadata: Iterable[tuple[str, str | bytes]] | None, extra: tuple[tuple[str, str], ...]
) -> list[tuple[str, str | bytes]]:
    return [*(metadata or ()), *extra]


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _AddMetadata(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds fixed metadata (the API key) to every call of a blocking channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(  # type: ignore[return-value]  # the documented way: a look-alike
            details.method,
            details.timeout,
            _merged(details.metadata, self._metadata),
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request_iterator: Any
    ) -> Any:
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(
        self, continuation: Callable[..., Any], client_call_details: Any, request_iterator: Any
    ) -> Any:
        return continuation(self._details(client_call_details), request_iterator)


def _aio_details(
    details: grpc.aio.ClientCallDetails, extra: tuple[tuple[str, str], ...]
) -> grpc.aio.ClientCallDetails:
    return grpc.aio.ClientCallDetails(
        details.method,
        details.timeout,
        grpc.aio.Metadata(*_merged(details.metadata, extra)),
        details.credentials,
        details.wait_for_ready,
    )


class _AioUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(_aio_details(client_call_details, self._metadata), request)


class _AioUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(_aio_details(client_call_details, self._metadata), request)


class _AioStreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    async def intercept_stream_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(
            _aio_details(client_call_details, self._metadata), request_iterator
        )


class _AioStreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(
            _aio_details(client_call_details, self._metadata), request_iterator
        )


def _aio_interceptors(metadata: tuple[tuple[str, str], ...]) -> list[grpc.aio.ClientInterceptor]:
    # grpc.aio picks interceptors by their base class, one per call shape.
    return [
        _AioUnaryUnary(metadata),
        _AioUnaryStream(metadata),
        _AioStreamUnary(metadata),
        _AioStreamStream(metadata),
    ]


# -- the terminal clients' flags -----------------------------------------------------------


def add_connection_args(parser: argparse.ArgumentParser, *, note: str = "") -> None:
    """``--ssl*`` and ``--api-key`` for a command that talks to a server."""
    group = parser.add_argument_group(
        "connection",
        "TLS and the API key for the server" + (f" ({note})" if note else "") + "; the key "
        f"defaults to ${API_KEY_ENV}",
    )
    group.add_argument(
        "--ssl", action="store_true", default=None,
        help="TLS, the server verified against the system's roots (implied by --ssl-*)",
    )
    group.add_argument(
        "--ssl-ca-certs", metavar="PEM", help="CA certificates to verify the server with (TLS)"
    )
    group.add_argument(
        "--ssl-certfile", metavar="PEM", help="client certificate, for a server asking one (mTLS)"
    )
    group.add_argument("--ssl-keyfile", metavar="PEM", help="the client certificate's key")
    group.add_argument(
        "--ssl-server-name", metavar="NAME",
        help="the name the server's certificate must carry, when not the address's host",
    )
    group.add_argument(
        "--api-key", default=None,
        help=f"sent as 'authorization: Bearer <key>' (default: ${API_KEY_ENV}); visible in "
        "`ps`, the variable is not",
    )


def connection_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] = os.environ
) -> dict[str, Any]:
    """The client keyword arguments (``GenerationClient(target, **these)``) the flags ask for."""
    api_key = args.api_key if args.api_key is not None else environ.get(API_KEY_ENV) or None
    return {
        "ssl": args.ssl,
        "ssl_ca_certs": args.ssl_ca_certs,
        "ssl_certfile": args.ssl_certfile,
        "ssl_keyfile": args.ssl_keyfile,
        "ssl_server_name": args.ssl_server_name,
        "api_key": api_key,
    }
