"""Request spans: one SERVER span per RPC, its ``queue``/``prefill``/``decode`` children, and
``engine.step`` spans linked to the requests each step served.

The event loop only opens the SERVER span (parented on the caller's ``traceparent``) and posts
two messages per RPC. The rest happens on the telemetry thread (``observer.py``): step spans
from the engine's StepInfo, and, once both the RPC and the engine are done with a request, the
phase children built from its RequestTimes with explicit start and end times, then the end of
the SERVER span. Nothing here runs per token, and the engine thread does no span work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import propagate
from opentelemetry.context import Context
from opentelemetry.trace import (
    Link,
    Span,
    SpanKind,
    Status,
    StatusCode,
    Tracer,
    set_span_in_context,
)

from pagedserve.backend.engine.request import FinishReason, RequestOutputDelta
from pagedserve.backend.sampling_params import MAX_TOKENS_UNSET
from pagedserve.backend.telemetry import names as n

if TYPE_CHECKING:
    from pagedserve.backend.engine.messages import StepInfo
    from pagedserve.backend.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class RpcBegun:
    """An RPC's request is about to reach the engine (its steps may link to it now)."""

    trace: RpcTrace


@dataclass(frozen=True, slots=True)
class RpcEnded:
    """An RPC has ended, with the status the client sees."""

    trace: RpcTrace


# How a trace hands its events to the telemetry thread (in order with the engine's).
Post = Callable[[RpcBegun | RpcEnded], None]
_NS = 1_000_000_000
# HTTP statuses from here on are errors (4xx the client's, 5xx the server's).
_HTTP_ERROR = 400
_INTERNAL_ERROR = 500
_CUT_SHORT = (FinishReason.ABORT, FinishReason.ERROR)


def _ns(t: float) -> int:
    return int(t * _NS)


class RpcTrace:
    """The SERVER span of one RPC (or one HTTP request: ``http``) and what the telemetry thread
    needs to finish it."""

    __slots__ = (
        "span", "context", "request_id", "_post", "begun", "admitted", "rpc_ended", "end_ns",
        "end_time", "code", "details", "final", "deadline", "http", "http_status", "in_band",
    )

    def __init__(self, span: Span, request_id: str, post: Post, *, http: bool = False) -> None:
        self.span = span
        self.context = span.get_span_context()
        self.request_id = request_id
        self._post = post
        self.begun = False  # handed to the engine (step links may point at it)
        self.admitted = False  # the engine accepted it: its final delta will come
        self.rpc_ended = False
        self.end_ns = 0
        self.end_time = 0.0
        self.code = grpc.StatusCode.OK
        self.details: str | None = None
        self.final: RequestOutputDelta | None = None
        self.deadline = 0.0
        self.http = http
        # What the handler answered (``respond``); None at the end: the client went away.
        self.http_status: int | None = 200
        # The status of a request answered inside a stream that goes on (``answer_in_band``).
        self.in_band: tuple[grpc.StatusCode, str | None] | None = None

    def start_request(
        self, *, model: str, served_model: str, chat: bool, stream: bool, params: SamplingParams
    ) -> None:
        """Call right before the engine gets the request, so its first step can link here."""
        attributes: dict[str, Any] = {
            n.GEN_AI_OPERATION_NAME: n.OPERATION_CHAT if chat else n.OPERATION_TEXT_COMPLETION,
            n.GEN_AI_PROVIDER_NAME: n.PROVIDER,
            n.GEN_AI_REQUEST_MODEL: model or served_model,
            n.GEN_AI_RESPONSE_MODEL: served_model,
            n.GEN_AI_RESPONSE_ID: self.request_id,
            n.GEN_AI_REQUEST_STREAM: stream,
            n.GEN_AI_REQUEST_TEMPERATURE: params.temperature,
            n.GEN_AI_REQUEST_TOP_P: params.top_p,
            n.GEN_AI_REQUEST_PRESENCE_PENALTY: params.presence_penalty,
            n.GEN_AI_REQUEST_FREQUENCY_PENALTY: params.frequency_penalty,
        }
        if params.max_tokens != MAX_TOKENS_UNSET:  # unset: the server's default applies
            attributes[n.GEN_AI_REQUEST_MAX_TOKENS] = params.max_tokens
        if params.top_k > 0:  # -1: no top-k
            attributes[n.GEN_AI_REQUEST_TOP_K] = params.top_k
        if params.seed is not None:
            attributes[n.GEN_AI_REQUEST_SEED] = params.seed
        if params.stop:
            attributes[n.GEN_AI_REQUEST_STOP_SEQUENCES] = list(params.stop)
        self.span.set_attributes(attributes)
        self.begun = True
        self._post(RpcBegun(self))

    def mark_admitted(self) -> None:
        self.admitted = True

    def respond(self, status: int, details: str | None = None) -> None:
        """An HTTP handler's answer: its status (on a stream, that of an error sent in-band)."""
        self.http_status = status
        self.details = details

    def answer_in_band(self, code: grpc.StatusCode, details: str | None) -> None:
        """A request of a multiplexed stream (KServe ModelStreamInfer) failed with this status,
        sent in a message while the call itself goes on: its span ends with it."""
        self.in_band = (code, details)

    def end(self, code: grpc.StatusCode, details: str | None) -> None:
        self.end_ns = time.time_ns()
        self.end_time = self.end_ns / _NS
        self.code = code
        self.details = details
        self._post(RpcEnded(self))

    def end_http(self, status: int | None, details: str | None) -> None:
        self.http_status = status
        self.end(grpc.StatusCode.OK, details)

    def error_type(self) -> str | None:
        """error.type as the RPC or HTTP conventions put it; None for a success."""
        if not self.http:
            return None if self.code == grpc.StatusCode.OK else self.code.name
        if self.http_status is None:
            return n.ERROR_CLIENT_DISCONNECTED
        return str(self.http_status) if self.http_status >= _HTTP_ERROR else None

    def status_attributes(self) -> dict[str, Any]:
        if not self.http:
            return {n.RPC_GRPC_STATUS_CODE: self.code.value[0]}
        if self.http_status is None:
            return {}
        return {n.HTTP_RESPONSE_STATUS_CODE: self.http_status}


class NoTrace:
    """What services get while tracing is off (or the request is not sampled)."""

    __slots__ = ()

    def start_request(self, **_: Any) -> None:
        pass

    def mark_admitted(self) -> None:
        pass

    def respond(self, status: int, details: str | None = None) -> None:
        pass

    def answer_in_band(self, code: grpc.StatusCode, details: str | None) -> None:
        pass


NO_TRACE = NoTrace()


class UntracedHttp(NoTrace):
    """An untraced HTTP request: only the status it was answered with, for the request
    counter (``RpcTrace.http_status`` is the traced one's)."""

    __slots__ = ("http_status",)

    def __init__(self) -> None:
        self.http_status: int | None = 200

    def respond(self, status: int, details: str | None = None) -> None:
        self.http_status = status


# A cancel this close to the call's deadline is the deadline: the client's own timer fires and
# its cancel can reach the server a moment before the server's copy of the deadline expires.
DEADLINE_SLACK_S = 0.05


def _carrier(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


def _outcome(
    error: BaseException | None, context: grpc.aio.ServicerContext
) -> tuple[grpc.StatusCode, str | None]:
    """The status the client sees: from the aborted context, a cancel, or an escaped error."""
    if isinstance(error, asyncio.CancelledError):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= DEADLINE_SLACK_S:
            return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
        return grpc.StatusCode.CANCELLED, "cancelled by the client"
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code, context.details() or None
    if error is not None and not isinstance(error, grpc.aio.AbortError):
        return grpc.StatusCode.UNKNOWN, f"{type(error).__name__}: {error}"
    return grpc.StatusCode.OK, None


@contextmanager
def rpc_span(
    tracer: Tracer,
    post: Post,
    service: str,
    method: str,
    context: grpc.aio.ServicerContext,
    request_id: str,
) -> Iterator[RpcTrace | NoTrace]:
    """The SERVER span of one RPC (or of one request multiplexed on a stream), child of the
    caller's ``traceparent``; ended (from the telemetry thread) with the status the client saw:
    the call's, or the request's in-band one (``answer_in_band``)."""
    span = tracer.start_span(
        f"{service}/{method}",
        context=propagate.extract(_carrier(context)),
        kind=SpanKind.SERVER,
        attributes={n.RPC_SYSTEM: "grpc", n.RPC_SERVICE: service, n.RPC_METHOD: method},
    )
    if not span.is_recording():
        yield NO_TRACE
        return
    trace = RpcTrace(span, request_id, post)
    try:
        yield trace
    except BaseException as error:
        trace.end(*_outcome(error, context))
        raise
    trace.end(*(trace.in_band or _outcome(None, context)))


@contextmanager
def http_span(
    tracer: Tracer,
    post: Post,
    method: str,
    route: str,
    headers: Mapping[str, str],
    request_id: str,
    scheme: str,
) -> Iterator[RpcTrace | NoTrace]:
    """The SERVER span of one HTTP request, child of its ``traceparent`` header exactly as an
    RPC's span is of its metadata; ended with the status the handler ``respond``ed, or as
    client_disconnected when the handler was cancelled (the client went away)."""
    span = tracer.start_span(
        f"{method} {route}",
        context=propagate.extract({k.lower(): v for k, v in headers.items()}),
        kind=SpanKind.SERVER,
        attributes={n.HTTP_REQUEST_METHOD: method, n.HTTP_ROUTE: route, n.URL_SCHEME: scheme},
    )
    if not span.is_recording():
        yield UntracedHttp()  # not sampled: the status is still counted
        return
    trace = RpcTrace(span, request_id, post, http=True)
    try:
        yield trace
    except (asyncio.CancelledError, ConnectionError):
        trace.end_http(None, "the client disconnected")
        raise
    except BaseException as error:
        trace.end_http(_INTERNAL_ERROR, f"{type(error).__name__}: {error}")
        raise
    trace.end_http(trace.http_status, trace.details)


class RequestTracer:
    """Telemetry-thread side: step links, then each request's phases once it is complete.

    Single-threaded (the observer's thread calls every method), so it needs no locks.
    """

    def __init__(self, tracer: Tracer, *, trace_steps: bool, final_wait_s: float) -> None:
        self._tracer = tracer
        self._trace_steps = trace_steps
        self._final_wait_s = final_wait_s
        # Requests steps may link to, by id (a list: a reused id may overlap its predecessor).
        self._linkable: dict[str, list[RpcTrace]] = {}
        # Ended RPCs in end order; dropped from _linkable once a step starts after their end.
        self._ended: deque[RpcTrace] = deque()
        # Handed to the engine, its final delta not yet seen.
        self._open: dict[str, list[RpcTrace]] = {}
        # RPC over, admitted, still waiting for the engine's final delta (deadline order).
        self._waiting: dict[RpcTrace, None] = {}

    # -- messages ------------------------------------------------------------------------------
    def on_begin(self, trace: RpcTrace) -> None:
        self._linkable.setdefault(trace.request_id, []).append(trace)
        self._open.setdefault(trace.request_id, []).append(trace)

    def on_finished(self, delta: RequestOutputDelta) -> None:
        """The engine's final delta for a request (finished, failed or aborted)."""
        pending = self._open.get(delta.request_id)
        if not pending:
            return
        trace = pending.pop(0)
        if not pending:
            del self._open[delta.request_id]
        trace.final = delta
        if trace.rpc_ended:
            self._waiting.pop(trace, None)
            self._finish(trace)

    def on_rpc_end(self, trace: RpcTrace) -> None:
        trace.rpc_ended = True
        if trace.begun:
            self._ended.append(trace)
        if trace.begun and not trace.admitted:  # refused before the engine saw it
            _remove(self._open, trace)
            _remove(self._linkable, trace)
        if not trace.admitted or trace.final is not None:
            self._finish(trace)
            return
        trace.deadline = time.monotonic() + self._final_wait_s
        self._waiting[trace] = None

    def on_step(self, info: StepInfo) -> None:
        ended = self._ended
        while ended and ended[0].end_time < info.start:
            _remove(self._linkable, ended.popleft())
        if not self._trace_steps:
            return
        links = []
        linkable = self._linkable
        for request_id in info.request_ids:
            traces = linkable.get(request_id)
            if traces:
                links.append(Link(traces[0].context, {n.REQUEST_ID: request_id}))
        if not links:
            return
        span = self._tracer.start_span(
            n.STEP_SPAN,
            context=Context(),
            kind=SpanKind.INTERNAL,
            links=links,
            start_time=_ns(info.start),
            attributes={
                n.STEP_BATCH_SIZE: len(info.request_ids),
                n.STEP_PREFILL_TOKENS: info.num_prefill_tokens,
                n.STEP_DECODE_TOKENS: info.num_decode_tokens,
                n.STEP_PREEMPTED: info.num_preempted,
                n.KV_CACHE_USAGE: info.kv_cache_usage,
            },
        )
        span.end(end_time=_ns(info.end))

    def expire(self, now: float) -> None:
        """Finish RPCs whose engine final delta is overdue (the engine died, or refused the
        request from its queue): their spans still end, with what the RPC knew."""
        while self._waiting:
            trace = next(iter(self._waiting))
            if trace.deadline > now:
                return
            del self._waiting[trace]
            _remove(self._open, trace)
            self._finish(trace)

    def close(self) -> None:
        self.expire(float("inf"))

    # -- span building ---------------------------------------------------------------------------
    def _finish(self, trace: RpcTrace) -> None:
        span = trace.span
        error_type = trace.error_type()
        if trace.final is not None:
            self._phases(trace, trace.final, error_type)
        span.set_attributes(trace.status_attributes())
        if error_type is not None:
            span.set_attribute(n.ERROR_TYPE, error_type)
            span.set_status(Status(StatusCode.ERROR, trace.details))
        span.end(end_time=trace.end_ns)

    def _phases(self, trace: RpcTrace, final: RequestOutputDelta, error_type: str | None) -> None:
        """queue, prefill and decode children from the engine's marks, clamped to the RPC."""
        times = final.times
        if times is None:
            return
        end = trace.end_ns
        finished = min(_ns(times.finished) if times.finished else end, end)
        marks = [
            (name, min(_ns(t), finished))
            for name, t in (
                (n.QUEUE_SPAN, times.arrival),
                (n.PREFILL_SPAN, times.first_scheduled),
                (n.DECODE_SPAN, times.first_token),
            )
            if t is not None
        ]
        parent = set_span_in_context(trace.span)
        spans = {
            name: self._tracer.start_span(name, context=parent, start_time=start)
            for name, start in marks
        }
        usage = final.usage
        if n.PREFILL_SPAN in spans:
            prefill = spans[n.PREFILL_SPAN]
            prefill.set_attribute(n.PREFILL_CHUNKS, final.num_prefill_chunks)
            if usage is not None:
                prefill.set_attribute(n.GEN_AI_USAGE_INPUT_TOKENS, usage.prompt_tokens)
                prefill.set_attribute(
                    n.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS, usage.cached_prompt_tokens
                )
        if n.DECODE_SPAN in spans and usage is not None:
            spans[n.DECODE_SPAN].set_attribute(n.GEN_AI_USAGE_OUTPUT_TOKENS, usage.completion_tokens)
        for t in times.preempted:  # before the first token it interrupted the prefill
            in_decode = times.first_token is not None and t >= times.first_token
            span = spans.get(n.DECODE_SPAN if in_decode else n.PREFILL_SPAN)
            if span is not None:
                span.add_event(n.PREEMPTION_EVENT, timestamp=min(_ns(t), finished))
        last_name = marks[-1][0]
        if final.finish_reason in _CUT_SHORT:
            reason = error_type or final.finish_reason.value
            spans[last_name].set_attribute(n.ERROR_TYPE, reason)
            spans[last_name].set_status(Status(StatusCode.ERROR, final.error or reason))
        for i, (name, _) in enumerate(marks):
            spans[name].end(end_time=marks[i + 1][1] if i + 1 < len(marks) else finished)
        trace.span.set_attributes(_response_attributes(final))


def _response_attributes(final: RequestOutputDelta) -> dict[str, Any]:
    attributes: dict[str, Any] = {n.PREEMPTIONS: final.num_preemptions}
    if final.finish_reason is not None:
        attributes[n.GEN_AI_RESPONSE_FINISH_REASONS] = [final.finish_reason.value]
    if final.usage is not None:
        attributes[n.GEN_AI_USAGE_INPUT_TOKENS] = final.usage.prompt_tokens
        attributes[n.GEN_AI_USAGE_OUTPUT_TOKENS] = final.usage.completion_tokens
        attributes[n.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] = final.usage.cached_prompt_tokens
    times = final.times
    if times is not None and times.first_token is not None:
        attributes[n.TIME_TO_FIRST_TOKEN] = times.first_token - times.arrival
    if times is not None and times.first_scheduled is not None:
        attributes[n.TIME_IN_QUEUE] = times.first_scheduled - times.arrival
    return attributes


def _remove(index: dict[str, list[RpcTrace]], trace: RpcTrace) -> None:
    traces = index.get(trace.request_id)
    if not traces:
        return
    for i, t in enumerate(traces):
        if t is trace:
            del traces[i]
            break
    if not traces:
        del index[trace.request_id]

