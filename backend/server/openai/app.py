"""The HTTP listener: the aiohttp application, its security and its life beside grpc.aio.

aiohttp rather than an ASGI stack: one dependency that runs on the event loop the gRPC server
already runs (no second server loop, no thread between them), whose streaming responses are
plain awaited writes, and which cancels a handler whose client disconnects
(``handler_cancellation``), which is what aborts an engine request the moment nobody reads it.

Security is the gRPC port's: the same certificate, key and client CAs (mTLS), and the same API
key, asked as ``Authorization: Bearer <key>`` on every path but ``/health`` (probes need none)
and refused with 401 in OpenAI's error shape before any handler runs (no span, a rate-limited
log line). Every failure, aiohttp's own (unknown path, wrong method, a body over
``--max-message-bytes``) included, is answered in OpenAI's error shape.
"""

from __future__ import annotations

import logging
import socket
from http import HTTPStatus

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from pagedserve.backend.config import ServerConfig
from pagedserve.backend.server import security
from pagedserve.backend.server.openai.errors import ApiError
from pagedserve.backend.server.openai.routes import BODY_LIMIT, HEALTH, OpenAIRoutes
from pagedserve.backend.server.state import ServerState

logger = logging.getLogger(__name__)

# Reachable without a key: liveness and readiness probes.
OPEN_PATHS = frozenset({HEALTH})
MISSING_KEY = "missing API key: send the header 'Authorization: Bearer <key>'"
_BACKLOG = 1024
_REFUSAL_LOG_INTERVAL_S = 60.0


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own refusals (404, 405, 413) in OpenAI's error shape too."""
    try:
        return await handler(request)
    except ApiError as error:
        return error.response()
    except web.HTTPException as error:
        if error.status < HTTPStatus.BAD_REQUEST:
            raise
        headers = {"Allow": error.headers["Allow"]} if "Allow" in error.headers else None
        message = f"{error.reason}: {request.method} {request.path}"
        return ApiError(HTTPStatus(error.status), message).response(headers)


def require_api_key(key: security.ApiKey) -> Middleware:
    refusals = security.RefusalLog(_REFUSAL_LOG_INTERVAL_S)

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        values = request.headers.getall("Authorization", [])
        if key.authorizes(values):
            return await handler(request)
        reason = MISSING_KEY if not any(security.bearer_tokens(values)) else security.WRONG_KEY
        refusals.note(f"{request.method} {request.path}", str(request.remote), reason)
        # Unknown paths too: without the key, nothing is told about the API.
        return ApiError(HTTPStatus.UNAUTHORIZED, reason, code="invalid_api_key").response(
            {"WWW-Authenticate": "Bearer"}
        )

    return check


def build_app(state: ServerState, config: ServerConfig) -> web.Application:
    middlewares: list[Middleware] = [openai_errors]
    if config.api_key is not None:
        middlewares.append(require_api_key(security.ApiKey(config.api_key)))
    app = web.Application(middlewares=middlewares, client_max_size=config.max_message_bytes)
    app[BODY_LIMIT] = config.max_message_bytes
    OpenAIRoutes(state).add_to(app)
    return app


def _listen(host: str, port: int) -> socket.socket:
    """The bound listening socket; a busy port is an OSError naming it and the flag."""
    try:
        family, _, _, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as error:
        raise OSError(f"cannot serve the HTTP API on {host}:{port}: {error}") from None
    try:
        # Lets a restarted server bind over connections in TIME_WAIT, never over a listener.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(_BACKLOG)
    except OSError as error:
        sock.close()
        raise OSError(
            f"cannot serve the HTTP API on {host}:{port}: {error.strerror or error} "
            "(--http-port; 0 turns it off)"
        ) from None
    sock.setblocking(False)
    return sock


class OpenAIServer:
    """The HTTP API's listener on the running event loop."""

    def __init__(self, config: ServerConfig, state: ServerState, shutdown_timeout_s: float) -> None:
        """``shutdown_timeout_s``: how long ``stop`` lets open requests run (the drain's)."""
        assert config.http_port is not None
        self._config = config
        self._state = state
        self._shutdown_timeout_s = shutdown_timeout_s
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> int:
        """Bind (OSError when the port is taken) and serve; returns the port."""
        config = self._config
        assert config.http_port is not None
        tls = security.load_tls(config.ssl_certfile, config.ssl_keyfile, config.ssl_ca_certs)
        sock = _listen(config.host, config.http_port)
        runner = web.AppRunner(
            build_app(self._state, config),
            handler_cancellation=True,  # a client that disconnects cancels its handler
            access_log=None,
            shutdown_timeout=self._shutdown_timeout_s,
        )
        try:
            await runner.setup()
            site = web.SockSite(runner, sock, ssl_context=tls.context if tls else None)
            await site.start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = sock.getsockname()[1]
        logger.info(
            "OpenAI-compatible API on %s://%s:%d%s",
            "https" if tls is not None else "http",
            config.host,
            self.port,
            " (client certificates required)" if tls is not None and tls.mutual else "",
        )
        return self.port

    async def stop(self) -> None:
        """Stop listening and close idle connections at once; open requests get the
        shutdown timeout, then are cancelled (which aborts their engine requests)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
