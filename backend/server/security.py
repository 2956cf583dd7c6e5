"""Transport security and API keys for every port that serves requests.

- **TLS / mTLS** (``ServerConfig.ssl_certfile``/``ssl_keyfile``/``ssl_ca_certs``): the files are
  read and checked once with Python's ``ssl`` module (readable, PEM, the key is the
  certificate's, the CA bundle parses) so a bad combination fails at start with one line that
  names the file, before the model loads; gRPC then gets the same bytes. With ``ssl_ca_certs``
  a client must present a certificate signed by one of those CAs.
- **API key** (``ServerConfig.api_key``): one grpc.aio server interceptor in front of every
  service. A call needs metadata ``authorization: Bearer <key>`` (the scheme is
  case-insensitive); nothing else is read (no ``x-api-key``: one header, the one proxies and
  log pipelines already redact). The services in ``OPEN_SERVICES`` (health, reflection) need
  none, so probes and tools keep working; every other service, present or future, is behind
  the key without opting in. An authorized call gets the service's own handler, untouched, so
  its cancellation, deadline, drain and tracing are exactly those of a server without a key. A
  refused call never reaches a service: it ends at once with UNAUTHENTICATED, gets no span (a
  caller without the key cannot make the server write traces) and is logged, at most one line
  a minute with the count.
- **The HTTP API** (``backend/server/openai/app.py``): the gRPC port's TLS material and key,
  ``Authorization: Bearer`` on every path but ``/health``, 401 in OpenAI's error shape.
- **Metrics** (``TelemetryConfig.metrics_*``): the same checks over HTTP: TLS from the given
  files, and when ``metrics_api_key`` is set, ``Authorization: Bearer`` or 401 with
  ``WWW-Authenticate: Bearer``.

Tokens are compared as SHA-256 digests with ``hmac.compare_digest``: constant time, and the
comparison reveals neither a common prefix nor the key's length. No message carries a token.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from prometheus_client import CollectorRegistry

    from pagedserve.backend.config import ServerConfig, TelemetryConfig

logger = logging.getLogger(__name__)

API_KEY_ENV = "PAGEDSERVE_API_KEY"
AUTHORIZATION = "authorization"
BEARER = "bearer"
# Reachable without a key: liveness/readiness probes and schema discovery (grpcurl, Postman).
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)
MISSING_KEY = "missing API key: send metadata 'authorization: Bearer <key>'"
WRONG_KEY = "invalid API key"
_REFUSAL_LOG_INTERVAL_S = 60.0
# A metrics connection that has not finished its TLS handshake or request by then is dropped.
_METRICS_IO_TIMEOUT_S = 10.0


class SecurityConfigError(ValueError):
    """A TLS or API-key setting that cannot work; the message is the one line to print."""


# -- API key -------------------------------------------------------------------------------


class ApiKey:
    """The server's key, kept only as its digest; ``repr`` never shows it."""

    def __init__(self, key: str, *, source: str = "the API key") -> None:
        if not key:
            raise SecurityConfigError(f"{source} is empty")
        if not all(c.isascii() and c.isprintable() and not c.isspace() for c in key):
            raise SecurityConfigError(
                f"{source} must be printable ASCII without spaces (it travels in a header)"
            )
        self._digest = _digest(key)

    def matches(self, token: str) -> bool:
        return hmac.compare_digest(_digest(token), self._digest)

    def authorizes(self, values: Iterable[str]) -> bool:
        """Whether any ``Authorization`` value is ``Bearer <this key>``. Every value is
        compared: the time taken does not tell which one, if any, matched."""
        matched = False
        for token in bearer_tokens(values):
            matched |= self.matches(token)
        return matched

    def __repr__(self) -> str:
        return "ApiKey(<hidden>)"


def _digest(text: str) -> bytes:
    # "replace": any non-ASCII token becomes bytes no ASCII key can have; it cannot raise.
    return hashlib.sha256(text.encode("utf-8", "replace")).digest()


def bearer_tokens(values: Iterable[str]) -> Iterator[str]:
    """The tokens of the ``Bearer`` values among ``values`` (RFC 6750; scheme any case)."""
    for value in values:
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == BEARER:
            yield token.strip()


def read_api_key_file(path: str) -> str:
    """The key in ``path``: its content without the surrounding whitespace (a final newline)."""
    try:
        return Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise SecurityConfigError(f"cannot read --api-key-file {path}: {_reason(error)}") from None


def resolve_api_key(
    flag: str | None, file: str | None, environ: Mapping[str, str]
) -> str | None:
    """``--api-key``, else ``--api-key-file``, else ``$PAGEDSERVE_API_KEY``, else none.

    A variable that is set but empty is an error, not "no key": a secret that failed to
    mount must not leave the server open.
    """
    if flag is not None and file is not None:
        raise SecurityConfigError("give --api-key or --api-key-file, not both")
    if flag is not None:
        key, source = flag, "--api-key"
    elif file is not None:
        key, source = read_api_key_file(file), f"--api-key-file {file}"
    elif API_KEY_ENV in environ:
        key, source = environ[API_KEY_ENV], f"${API_KEY_ENV}"
    else:
        return None
    ApiKey(key, source=source)
    return key


# -- TLS -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsNames:
    """What the messages call the three files (flags for the gRPC port, fields otherwise)."""

    certfile: str = "--ssl-certfile"
    keyfile: str = "--ssl-keyfile"
    ca_certs: str = "--ssl-ca-certs"


GRPC_TLS_NAMES = TlsNames()
METRICS_TLS_NAMES = TlsNames("metrics_ssl_certfile", "metrics_ssl_keyfile", "metrics_ssl_ca_certs")


@dataclass(frozen=True)
class TlsMaterial:
    """Checked PEM files: the server's chain and key, and the client CAs for mTLS."""

    certificate_chain: bytes
    private_key: bytes = field(repr=False)
    client_ca: bytes | None
    context: ssl.SSLContext = field(repr=False)

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.mutual,
        )


def load_tls(
    certfile: str | None,
    keyfile: str | None,
    ca_certs: str | None,
    names: TlsNames = GRPC_TLS_NAMES,
) -> TlsMaterial | None:
    """The files checked and read, or None when none is given (plaintext)."""
    if certfile is None and keyfile is None:
        if ca_certs is not None:
            raise SecurityConfigError(
                f"{names.ca_certs} needs {names.certfile} and {names.keyfile}: "
                "client certificates are checked during a TLS handshake"
            )
        return None
    if keyfile is None:
        raise SecurityConfigError(f"{names.certfile} needs {names.keyfile}")
    if certfile is None:
        raise SecurityConfigError(f"{names.keyfile} needs {names.certfile}")
    chain = _certificates(certfile, names.certfile)
    key = _read(keyfile, names.keyfile)
    if b"PRIVATE KEY-----" not in key:
        raise SecurityConfigError(f"{names.keyfile} {keyfile} holds no PEM private key")
    if b"ENCRYPTED" in key:
        raise SecurityConfigError(
            f"{names.keyfile} {keyfile} is encrypted; give the key unencrypted "
            "(protect it with file permissions or a secret mount)"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile, keyfile, password=_no_password)
    except ssl.SSLError as error:
        if error.reason == "KEY_VALUES_MISMATCH":
            raise SecurityConfigError(
                f"{names.keyfile} {keyfile} is not the private key of the certificate in "
                f"{names.certfile} {certfile}"
            ) from None
        raise SecurityConfigError(
            f"{names.keyfile} {keyfile} is not a valid PEM private key ({_reason(error)})"
        ) from None
    client_ca = None
    if ca_certs is not None:
        client_ca = _certificates(ca_certs, names.ca_certs)
        context.load_verify_locations(cadata=client_ca.decode("ascii"))
        context.verify_mode = ssl.CERT_REQUIRED
    return TlsMaterial(chain, key, client_ca, context)


def _certificates(path: str, name: str) -> bytes:
    """The PEM certificates in ``path``, each checked to parse."""
    pem = _read(path, name)
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise SecurityConfigError(f"{name} {path} holds no PEM certificate")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cadata=pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError) as error:
        raise SecurityConfigError(
            f"{name} {path} holds a certificate that does not parse ({_reason(error)})"
        ) from None
    return pem


def _read(path: str, name: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise SecurityConfigError(f"cannot read {name} {path}: {_reason(error)}") from None


def _no_password() -> str:
    # OpenSSL would otherwise prompt on the terminal for an encrypted key's password.
    raise SecurityConfigError("encrypted private keys are not supported")


def _reason(error: BaseException) -> str:
    if isinstance(error, ssl.SSLError):
        # OpenSSL's text without the "[SSL] " and "(_ssl.c:1234)" around it.
        text = str(error.strerror or error.reason or error)
        return re.sub(r"^\[\w+\]\s*|\s*\(_ssl\.c:\d+\)$", "", text)
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)


# -- the server's settings, checked and applied -----------------------------------------------


def validate(config: ServerConfig) -> None:
    """Every security setting of ``config`` checked (files read); raises SecurityConfigError."""
    load_tls(config.ssl_certfile, config.ssl_keyfile, config.ssl_ca_certs)
    if config.api_key is not None:
        ApiKey(config.api_key, source="the API key")
    validate_metrics(config.telemetry)


def validate_metrics(config: TelemetryConfig) -> None:
    _metrics_tls(config)
    if config.metrics_api_key is not None:
        ApiKey(config.metrics_api_key, source="the metrics API key")


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port, or None for plaintext."""
    tls = load_tls(config.ssl_certfile, config.ssl_keyfile, config.ssl_ca_certs)
    if tls is None:
        return None
    logger.info(
        "TLS on the gRPC port%s",
        " (client certificates required)" if tls.mutual else "",
    )
    return tls.grpc_credentials()


def server_interceptors(config: ServerConfig) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors every RPC goes through: the API key check when a key is set."""
    if config.api_key is None:
        return []
    logger.info(
        "API key required on every service but %s", ", ".join(sorted(OPEN_SERVICES))
    )
    return [ApiKeyInterceptor(ApiKey(config.api_key))]


# -- the interceptor -----------------------------------------------------------------------

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


def _service(method: str) -> str:
    """``/package.Service/Method`` -> ``package.Service``."""
    return method.lstrip("/").partition("/")[0]


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """``authorization: Bearer <key>`` on every RPC outside ``open_services``.

    Works on the handler, not on the messages: an authorized call gets the service's handler
    as it is (unary or streaming, either direction); a refused one a handler of the same shape
    that aborts before reading anything.
    """

    def __init__(self, key: ApiKey, open_services: frozenset[str] = OPEN_SERVICES) -> None:
        self._key = key
        self._open = open_services
        self._refusals = RefusalLog(_REFUSAL_LOG_INTERVAL_S)

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        if _service(method) in self._open:
            return await continuation(handler_call_details)
        values = [
            value
            for key, value in handler_call_details.invocation_metadata or ()
            if key == AUTHORIZATION and isinstance(value, str)
        ]
        if self._key.authorizes(values):
            return await continuation(handler_call_details)
        reason = MISSING_KEY if not any(bearer_tokens(values)) else WRONG_KEY
        # An unknown method is refused too: without the key, nothing is told about the API.
        return _refusal(await continuation(handler_call_details), method, reason, self._refusals)


def _refusal(
    handler: grpc.RpcMethodHandler | None, method: str, reason: str, log: RefusalLog
) -> grpc.RpcMethodHandler:
    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        log.note(method, context.peer(), reason)
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            reason,
            trailing_metadata=(("www-authenticate", "Bearer"),),
        )

    # No deserializers: the request is never parsed.
    if handler is None or not (handler.request_streaming or handler.response_streaming):
        return grpc.unary_unary_rpc_method_handler(refuse)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    return grpc.unary_stream_rpc_method_handler(refuse)


class RefusalLog:
    """One warning per ``interval_s`` at most, with how many calls were refused meanwhile."""

    def __init__(self, interval_s: float) -> None:
        self._interval_s = interval_s
        self._count = 0
        self._last = -float("inf")
        self._lock = threading.Lock()

    def note(self, method: str, peer: str, reason: str) -> None:
        with self._lock:
            self._count += 1
            now = time.monotonic()
            if now - self._last < self._interval_s:
                return
            count, self._count, self._last = self._count, 0, now
        logger.warning(
            "refused %d call(s) without a valid API key (latest: %s from %s: %s)",
            count, method, peer, reason,
        )


# -- the metrics endpoint ------------------------------------------------------------------


def metrics_secured(config: TelemetryConfig) -> bool:
    return any(
        value is not None
        for value in (
            config.metrics_ssl_certfile,
            config.metrics_ssl_keyfile,
            config.metrics_ssl_ca_certs,
            config.metrics_api_key,
        )
    )


def _metrics_tls(config: TelemetryConfig) -> TlsMaterial | None:
    return load_tls(
        config.metrics_ssl_certfile,
        config.metrics_ssl_keyfile,
        config.metrics_ssl_ca_certs,
        METRICS_TLS_NAMES,
    )


def require_bearer(app: WSGIApplication, key: ApiKey) -> WSGIApplication:
    """``app`` behind ``Authorization: Bearer <key>``; 401 with ``WWW-Authenticate`` else."""

    def guarded(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        header = environ.get("HTTP_AUTHORIZATION")
        if header is not None and key.authorizes([header]):
            return app(environ, start_response)
        body = (MISSING_KEY if header is None else WRONG_KEY).encode() + b"\n"
        start_response(
            "401 Unauthorized",
            [
                ("WWW-Authenticate", 'Bearer realm="metrics"'),
                ("Content-Type", "text/plain; charset=utf-8"),
                ("Content-Length", str(len(body))),
            ],
        )
        return [body]

    return guarded


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class MetricsServer(ThreadingMixIn, WSGIServer):
    """A thread per connection; with TLS the handshake runs on that thread (not in the accept
    loop, where one slow or hostile client would stall every scrape), bounded in time."""

    daemon_threads = True
    ssl_context: ssl.SSLContext | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(_METRICS_IO_TIMEOUT_S)
        if self.ssl_context is None:
            super().finish_request(request, client_address)
            return
        with self.ssl_context.wrap_socket(request, server_side=True) as tls:
            super().finish_request(tls, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Failed handshakes (no or untrusted client certificate, plain HTTP) are the client's.
        logger.debug("metrics connection from %s failed", client_address, exc_info=True)


def start_metrics_server(
    registry: CollectorRegistry, config: TelemetryConfig, host: str, port: int
) -> MetricsServer:
    """The Prometheus endpoint with TLS and/or the key, serving on a daemon thread."""
    from prometheus_client import make_wsgi_app

    tls = _metrics_tls(config)
    app = make_wsgi_app(registry)
    if config.metrics_api_key is not None:
        app = require_bearer(app, ApiKey(config.metrics_api_key, source="the metrics API key"))

    family, address = _best_family(host, port)

    class Server(MetricsServer):
        address_family = family

    server = make_server(address, port, app, Server, handler_class=_QuietHandler)
    server.ssl_context = tls.context if tls is not None else None
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


def _best_family(host: str, port: int) -> tuple[socket.AddressFamily, str]:
    """IPv4 or IPv6 as ``host`` asks (the HTTP server binds IPv4 unless told)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, sockaddr = infos[0]
    return family, str(sockaddr[0])
