"""Client spans for GenerationService calls, with the W3C ``traceparent`` sent as metadata.

The server parents its SERVER span on that header, so one trace runs client -> server ->
queue/prefill/decode. The tracer comes from the provider given to the client, else the global
one: with no OpenTelemetry SDK configured it is a no-op, calls are not wrapped and nothing is
sent (a caller's unsampled context still propagates, so the server honours the decision).
Needs only opentelemetry-api, so the clients stay free of torch and of the SDK.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from pagedserve.v1 import generation_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
INSTRUMENTATION_NAME = "pagedserve.clients"

Metadata = tuple[tuple[str, str], ...]


class ClientTracing:
    """Opens one CLIENT span per call and ends it with the call's outcome."""

    def __init__(self, target: str, tracer_provider: trace.TracerProvider | None) -> None:
        self._tracer = trace.get_tracer(INSTRUMENTATION_NAME, tracer_provider=tracer_provider)
        host, _, port = target.rpartition(":")
        self._attributes: dict[str, Any] = {
            "rpc.system": "grpc", "rpc.service": SERVICE_NAME, "server.address": host or target,
        }
        if port.isdigit():
            self._attributes["server.port"] = int(port)

    def start(self, method: str, request: pb.GenerateRequest) -> tuple[Span, Metadata]:
        """The call's span and the metadata that carries its context to the server."""
        attributes = {**self._attributes, "rpc.method": method}
        if request.model:
            attributes["gen_ai.request.model"] = request.model
        span = self._tracer.start_span(
            f"{SERVICE_NAME}/{method}", kind=SpanKind.CLIENT, attributes=attributes
        )
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(span))
        return span, tuple(carrier.items())


def end_span(
    span: Span, code: grpc.StatusCode, details: str | None, last: pb.GenerateResponse | None
) -> None:
    """Status and, from the final response, what the server reported."""
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code != grpc.StatusCode.OK:
        span.set_attribute("error.type", code.name)
        span.set_status(Status(StatusCode.ERROR, details))
    if last is not None and last.HasField("usage"):
        span.set_attribute("gen_ai.response.id", last.request_id)
        span.set_attribute("gen_ai.usage.input_tokens", last.usage.prompt_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", last.usage.completion_tokens)
    span.end()


class TracedStream:
    """A server-streaming call whose span ends when the stream does (or is cancelled).
    Everything else is the wrapped call's."""

    def __init__(self, call: Any, span: Span) -> None:
        self._call = call
        self._span: Span | None = span
        self._last: pb.GenerateResponse | None = None

    def _end(self, code: grpc.StatusCode, details: str | None) -> None:
        if self._span is not None:
            end_span(self._span, code, details, self._last)
            self._span = None

    def _failed(self, error: grpc.RpcError) -> None:
        self._end(error.code(), error.details())

    def cancel(self) -> bool:
        cancelled = self._call.cancel()
        self._end(grpc.StatusCode.CANCELLED, "cancelled by the client")
        return bool(cancelled)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)

    # -- blocking ----------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[pb.GenerateResponse]:
        return self

    def __next__(self) -> pb.GenerateResponse:
        try:
            response = next(self._call)
        except StopIteration:
            self._end(grpc.StatusCode.OK, None)
            raise
        except grpc.RpcError as error:
            self._failed(error)
            raise
        self._last = response
        return response

    # -- asyncio -----------------------------------------------------------------------------------
    def __aiter__(self) -> AsyncIterator[pb.GenerateResponse]:
        return self._aiterate()

    async def _aiterate(self) -> AsyncIterator[pb.GenerateResponse]:
        try:
            async for response in self._call:
                self._last = response
                yield response
            self._end(grpc.StatusCode.OK, None)
        except grpc.RpcError as error:
            self._failed(error)
            raise
        except asyncio.CancelledError:
            self._end(grpc.StatusCode.CANCELLED, "cancelled")
            raise
        finally:  # the consumer stopped reading early (a break): the call is left behind
            self._end(grpc.StatusCode.CANCELLED, "stream abandoned by the caller")
