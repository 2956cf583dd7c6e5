"""What one server owns for observability: its tracer provider (or none), its metrics registry
and HTTP endpoint, and the telemetry thread fed by the engine's listeners.

The server creates it before binding (``start`` binds the metrics port, so a busy port fails
startup like a busy gRPC port does), ``attach``es the engine once it is loaded and warmed (the
warm-up request is not traffic), hands ``rpc`` to the services, and ``shutdown``s it last,
which exports every span still open.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING

import grpc

from pagedserve.backend.config import TelemetryConfig
from pagedserve.backend.telemetry.metrics import ServingMetrics
from pagedserve.backend.telemetry.observer import Observer
from pagedserve.backend.telemetry.tracing import (
    NO_TRACE,
    NoTrace,
    RequestTracer,
    RpcTrace,
    UntracedHttp,
    http_span,
    rpc_span,
)
from pagedserve.backend.telemetry.tracing import _outcome as rpc_outcome  # the span's own status

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from opentelemetry.sdk.trace import TracerProvider

    from pagedserve.backend.engine.client import EngineClient

logger = logging.getLogger(__name__)

# The gRPC code an HTTP answer stands for: the OpenAI API's error statuses are picked from
# gRPC codes (server/openai/errors.py; a test keeps the two tables inverse), so one ``code``
# label counts every front's requests alike.
GRPC_CODE_OF_HTTP_STATUS: Mapping[int, grpc.StatusCode] = {
    200: grpc.StatusCode.OK,
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
}


def grpc_code_of_http_status(status: int | None) -> grpc.StatusCode:
    """None: the client went away before its answer was complete (CANCELLED, as on gRPC)."""
    if status is None:
        return grpc.StatusCode.CANCELLED
    return GRPC_CODE_OF_HTTP_STATUS.get(status, grpc.StatusCode.UNKNOWN)

INSTRUMENTATION_NAME = "pagedserve"
# How often the telemetry thread looks for request spans whose engine final is overdue.
_POLL_S = 0.5
_STOP_TIMEOUT_S = 10.0
_FLUSH_TIMEOUT_MS = 10_000


class ServerTelemetry:
    def __init__(
        self, config: TelemetryConfig, tracer_provider: TracerProvider | None = None
    ) -> None:
        self.config = config
        self.tracer_provider = tracer_provider
        self.metrics = ServingMetrics() if config.metrics_port is not None else None
        self._tracer = (
            tracer_provider.get_tracer(INSTRUMENTATION_NAME) if tracer_provider is not None else None
        )
        requests = (
            RequestTracer(
                self._tracer,
                trace_steps=config.trace_engine_steps,
                final_wait_s=config.engine_final_wait_s,
            )
            if self._tracer is not None
            else None
        )
        self._observer = (
            Observer(requests, self.metrics, _POLL_S)
            if requests is not None or self.metrics is not None
            else None
        )
        self._http: WSGIServer | None = None
        self.metrics_port: int | None = None

    @classmethod
    def from_config(cls, config: TelemetryConfig) -> ServerTelemetry:
        """OTLP export when an endpoint is configured (here or OTEL_*), metrics as configured."""
        from pagedserve.backend.telemetry.exporting import build_tracer_provider

        return cls(config, build_tracer_provider(config))

    @classmethod
    def disabled(cls) -> ServerTelemetry:
        return cls(TelemetryConfig(metrics_port=None))

    @property
    def tracing(self) -> bool:
        return self._tracer is not None

    def start(self) -> None:
        """Bind the metrics endpoint (OSError if the port is taken, SecurityConfigError for bad
        TLS files) and start the thread."""
        if self.metrics is not None:
            from prometheus_client import start_http_server

            from pagedserve.backend.server import security

            port = self.config.metrics_port
            host = self.config.metrics_host
            assert port is not None
            try:
                if security.metrics_secured(self.config):
                    self._http = security.start_metrics_server(
                        self.metrics.registry, self.config, host, port
                    )
                else:
                    self._http, _ = start_http_server(
                        port, addr=host, registry=self.metrics.registry
                    )
            except OSError as error:
                raise OSError(
                    f"cannot serve metrics on {host}:{port}: "
                    f"{error.strerror or error} (--metrics-port; 0 picks a free port)"
                ) from None
            self.metrics_port = self._http.server_port
            logger.info(
                "metrics on %s://%s:%d%s",
                "https" if self.config.metrics_ssl_certfile is not None else "http",
                host,
                self.metrics_port,
                " (API key required)" if self.config.metrics_api_key is not None else "",
            )
        if self._observer is not None:
            self._observer.start()
        if self.tracing:
            logger.info("tracing: exporting spans over OTLP")

    def attach(self, engine: EngineClient) -> None:
        """Observe ``engine``: its steps and deliveries go to the telemetry thread."""
        if self._observer is None:
            return
        if self.metrics is not None:
            self.metrics.bind(engine.model_info, engine.get_load)
        engine.add_step_listener(self._observer.on_step)
        engine.add_output_listener(self._observer.on_outputs)

    def rpc(
        self, service: str, method: str, context: grpc.aio.ServicerContext, request_id: str
    ) -> AbstractContextManager[RpcTrace | NoTrace]:
        """The RPC's SERVER span for the ``with`` block around the handler's body; the RPC is
        counted by its status whether or not it is traced."""
        span: AbstractContextManager[RpcTrace | NoTrace] = nullcontext(NO_TRACE)
        if self._tracer is not None and self._observer is not None:
            span = rpc_span(self._tracer, self._observer.post, service, method, context, request_id)
        if self.metrics is None:
            return span
        return self._counted(span, method, context)

    @contextmanager
    def _counted(
        self,
        span: AbstractContextManager[RpcTrace | NoTrace],
        method: str,
        context: grpc.aio.ServicerContext,
    ) -> Iterator[RpcTrace | NoTrace]:
        assert self.metrics is not None
        try:
            with span as trace:
                yield trace
        except BaseException as error:
            self.metrics.on_rpc_end(method, rpc_outcome(error, context)[0])
            raise
        self.metrics.on_rpc_end(method, rpc_outcome(None, context)[0])

    def http(
        self, method: str, route: str, headers: Mapping[str, str], request_id: str, scheme: str
    ) -> AbstractContextManager[RpcTrace | NoTrace]:
        """An HTTP request's SERVER span, as ``rpc`` opens an RPC's; the request is counted
        by its route and the gRPC code of its status whether or not it is traced."""
        span: AbstractContextManager[RpcTrace | NoTrace]
        if self._tracer is None or self._observer is None:
            span = nullcontext(UntracedHttp() if self.metrics is not None else NO_TRACE)
        else:
            span = http_span(
                self._tracer, self._observer.post, method, route, headers, request_id, scheme
            )
        if self.metrics is None:
            return span
        return self._counted_http(span, route)

    @contextmanager
    def _counted_http(
        self, span: AbstractContextManager[RpcTrace | NoTrace], route: str
    ) -> Iterator[RpcTrace | NoTrace]:
        assert self.metrics is not None
        try:
            with span as trace:
                yield trace
        except (asyncio.CancelledError, ConnectionError):  # the client went away
            self.metrics.on_rpc_end(route, grpc.StatusCode.CANCELLED)
            raise
        except BaseException:
            self.metrics.on_rpc_end(route, grpc.StatusCode.INTERNAL)
            raise
        assert isinstance(trace, (RpcTrace, UntracedHttp))
        self.metrics.on_rpc_end(route, grpc_code_of_http_status(trace.http_status))

    def flush(self, timeout_s: float) -> bool:
        """Handle everything posted so far and export the finished spans (tests, benchmarks)."""
        ok = self._observer.flush(timeout_s) if self._observer is not None else True
        if self.tracer_provider is not None:
            ok = self.tracer_provider.force_flush(int(timeout_s * 1000)) and ok
        return ok

    def shutdown(self) -> None:
        if self._observer is not None:
            self._observer.stop(_STOP_TIMEOUT_S)
        if self.tracer_provider is not None:
            self.tracer_provider.force_flush(_FLUSH_TIMEOUT_MS)
            self.tracer_provider.shutdown()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
