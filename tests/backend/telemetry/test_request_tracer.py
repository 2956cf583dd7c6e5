"""The telemetry thread's bookkeeping, driven directly: overdue engine finals, reused ids."""

from __future__ import annotations

import asyncio
import time

import grpc
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from pagedserve.backend.engine.messages import StepInfo
from pagedserve.backend.engine.request import FinishReason, RequestOutputDelta, RequestTimes, Usage
from pagedserve.backend.sampling_params import SamplingParams
from pagedserve.backend.telemetry.exporting import new_tracer_provider
from pagedserve.backend.telemetry.tracing import (
    DEADLINE_SLACK_S,
    RequestTracer,
    RpcBegun,
    RpcEnded,
    RpcTrace,
    _outcome,
)

WAIT_S = 5.0


class Harness:
    """A RequestTracer whose posted messages are delivered at once, as the observer would."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer = new_tracer_provider(SimpleSpanProcessor(self.exporter)).get_tracer("t")
        self.requests = RequestTracer(self.tracer, trace_steps=True, final_wait_s=WAIT_S)

    def post(self, item: RpcBegun | RpcEnded) -> None:
        if isinstance(item, RpcBegun):
            self.requests.on_begin(item.trace)
        else:
            self.requests.on_rpc_end(item.trace)

    def rpc(self, request_id: str) -> RpcTrace:
        trace = RpcTrace(self.tracer.start_span("rpc"), request_id, self.post)
        trace.start_request(
            model="", served_model="m", chat=False, stream=True, params=SamplingParams()
        )
        trace.mark_admitted()
        return trace

    def step(self, *request_ids: str) -> None:
        now = time.time()
        self.requests.on_step(StepInfo(now, now, list(request_ids), 1, 0, 0, 0.5))

    def names(self) -> list[str]:
        return [s.name for s in self.exporter.get_finished_spans()]


def _final(request_id: str, arrival: float) -> RequestOutputDelta:
    times = RequestTimes(arrival, arrival, arrival, time.time())
    return RequestOutputDelta(
        request_id, "", [], finished=True, finish_reason=FinishReason.LENGTH,
        usage=Usage(3, 1, 0), times=times,
    )


def test_an_overdue_engine_final_still_ends_the_rpc_span() -> None:
    h = Harness()
    trace = h.rpc("lost")
    trace.end(grpc.StatusCode.UNAVAILABLE, "engine died")
    h.requests.expire(time.monotonic())
    assert h.names() == []  # waiting for the engine's word
    h.requests.expire(time.monotonic() + WAIT_S + 1)
    (span,) = h.exporter.get_finished_spans()
    assert span.attributes["error.type"] == "UNAVAILABLE"
    assert "gen_ai.usage.output_tokens" not in span.attributes
    # A final that turns up later finds nothing open and changes nothing.
    h.requests.on_finished(_final("lost", time.time()))
    assert h.names() == ["rpc"]


def test_a_reused_request_id_links_and_finishes_the_newer_rpc() -> None:
    h = Harness()
    first = h.rpc("same")
    h.step("same")
    h.requests.on_finished(_final("same", time.time()))
    first.end(grpc.StatusCode.OK, None)
    second = h.rpc("same")  # the client reuses the id once the first is over
    time.sleep(0.001)
    h.step("same")
    steps = [s for s in h.exporter.get_finished_spans() if s.name == "engine.step"]
    assert [l.context.span_id for l in steps[0].links] == [first.context.span_id]
    assert [l.context.span_id for l in steps[1].links] == [second.context.span_id]
    h.requests.on_finished(_final("same", time.time()))
    second.end(grpc.StatusCode.OK, None)
    rpcs = [s for s in h.exporter.get_finished_spans() if s.name == "rpc"]
    assert [s.context.span_id for s in rpcs] == [first.context.span_id, second.context.span_id]
    assert all(s.attributes["gen_ai.usage.output_tokens"] == 1 for s in rpcs)


def test_a_step_of_untraced_requests_makes_no_span() -> None:
    h = Harness()
    h.step("not-traced", "also-not")
    assert h.names() == []


class _EndedCall:
    """What ``_outcome`` reads of a servicer context whose call was cancelled."""

    def __init__(self, remaining: float | None) -> None:
        self._remaining = remaining

    def time_remaining(self) -> float | None:
        return self._remaining

    def code(self) -> None:
        return None

    def details(self) -> None:
        return None


def test_a_cancel_at_the_deadline_counts_as_the_deadline() -> None:
    """The client's timer and its cancel can beat the server's copy of the deadline by a hair:
    that cancel is the deadline; one well before it is the client's."""
    cancelled = asyncio.CancelledError()
    for remaining, want in [
        (-0.01, grpc.StatusCode.DEADLINE_EXCEEDED),
        (0.0, grpc.StatusCode.DEADLINE_EXCEEDED),
        (DEADLINE_SLACK_S / 2, grpc.StatusCode.DEADLINE_EXCEEDED),
        (DEADLINE_SLACK_S * 2, grpc.StatusCode.CANCELLED),
        (None, grpc.StatusCode.CANCELLED),  # no deadline at all
    ]:
        assert _outcome(cancelled, _EndedCall(remaining))[0] == want, remaining  # type: ignore[arg-type]
