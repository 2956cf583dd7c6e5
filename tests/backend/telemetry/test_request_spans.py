"""Request span trees from a real server into an in-memory exporter: finished, cancelled,
timed-out, failed and refused requests, chunked prefill, preemption events and step links."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from pagedserve.clients.client import AsyncGenerationClient, GenerationClient
from pagedserve.clients.tracing import TracedStream
from tests.backend.server.harness import SlowSteps, all_blocks_free, wait_for
from tests.backend.telemetry.conftest import (
    TracedServer,
    by_name,
    children,
    steps_linking,
    traced_server,
)

GENERATE = "pagedserve.v1.GenerationService/Generate"
COMPLETE = "pagedserve.v1.GenerationService/Complete"
MAX_TOKENS = 6
SLOW_STEP_S = 0.02
FREE_TIMEOUT_S = 10.0


def _one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = by_name(spans, name)
    assert len(found) == 1, f"{name}: {len(found)} spans"
    return found[0]


def _assert_phases_tile(server_span: ReadableSpan, phases: dict[str, ReadableSpan]) -> None:
    """queue -> prefill -> decode back to back, all inside the SERVER span."""
    ordered = [phases[name] for name in ("queue", "prefill", "decode") if name in phases]
    assert ordered[0].name == "queue"
    for before, after in zip(ordered, ordered[1:]):
        assert before.end_time == after.start_time
    assert server_span.start_time <= ordered[0].start_time
    assert ordered[-1].end_time <= server_span.end_time
    for span in ordered:
        assert span.start_time <= span.end_time
        assert span.context.trace_id == server_span.context.trace_id
        assert span.kind == SpanKind.INTERNAL


def test_finished_stream_is_one_trace_from_the_client_span(fresh_either: TracedServer) -> None:
    fresh = fresh_either
    with GenerationClient(fresh.address, tracer_provider=fresh.provider) as client:
        call = client.generate(
            "Tell me", max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0.5, top_p=0.9,
            top_k=20, seed=7, request_id="finished-1",
        )
        assert isinstance(call, TracedStream)
        responses = list(call)
    streamed = sum(len(r.token_ids) for r in responses)
    assert streamed == MAX_TOKENS
    spans = fresh.spans(servers=1)

    client_span = next(s for s in by_name(spans, GENERATE) if s.kind == SpanKind.CLIENT)
    server_span = next(s for s in by_name(spans, GENERATE) if s.kind == SpanKind.SERVER)
    # Context propagation: the SERVER span is the client span's child in the same trace.
    assert client_span.parent is None
    assert server_span.parent is not None and server_span.parent.is_remote
    assert server_span.parent.span_id == client_span.context.span_id
    assert server_span.context.trace_id == client_span.context.trace_id

    a = server_span.attributes
    assert a["rpc.system"] == "grpc" and a["rpc.method"] == "Generate"
    assert a["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    assert a["gen_ai.operation.name"] == "text_completion"
    assert a["gen_ai.request.model"] == fresh.server.state.served_model_name
    assert a["gen_ai.request.max_tokens"] == MAX_TOKENS
    assert a["gen_ai.request.temperature"] == 0.5
    assert a["gen_ai.request.top_p"] == pytest.approx(0.9)
    assert a["gen_ai.request.top_k"] == 20
    assert a["gen_ai.request.seed"] == 7
    assert a["gen_ai.response.id"] == "finished-1"
    assert a["gen_ai.response.finish_reasons"] == ("length",)
    assert a["gen_ai.usage.output_tokens"] == streamed
    assert a["gen_ai.usage.input_tokens"] == responses[-1].usage.prompt_tokens
    assert a["pagedserve.preemptions"] == 0
    assert 0 < a["pagedserve.time_in_queue"] <= a["pagedserve.time_to_first_token"]
    assert "error.type" not in a
    assert server_span.status.status_code == StatusCode.UNSET

    phases = children(spans, server_span)
    assert set(phases) == {"queue", "prefill", "decode"}
    _assert_phases_tile(server_span, phases)
    assert phases["prefill"].attributes["pagedserve.prefill.chunks"] == 1
    assert phases["prefill"].attributes["gen_ai.usage.input_tokens"] == a["gen_ai.usage.input_tokens"]
    assert phases["decode"].attributes["gen_ai.usage.output_tokens"] == streamed
    ttft_ns = a["pagedserve.time_to_first_token"] * 1e9
    assert phases["decode"].start_time - phases["queue"].start_time == pytest.approx(ttft_ns, abs=1e3)

    # One engine.step per iteration that served it: the prefill, then one per further token.
    steps = steps_linking(spans, server_span)
    assert len(steps) == MAX_TOKENS
    for step in steps:
        assert step.parent is None and step.context.trace_id != server_span.context.trace_id
        assert step.attributes["pagedserve.step.batch_size"] >= 1
        assert 0 < step.attributes["pagedserve.kv_cache.usage"] <= 1
        link = next(l for l in step.links if l.context.span_id == server_span.context.span_id)
        assert link.attributes["pagedserve.request.id"] == "finished-1"
    steps.sort(key=lambda s: s.start_time)
    assert steps[0].attributes["pagedserve.step.prefill_tokens"] >= a["gen_ai.usage.input_tokens"]
    assert all(s.attributes["pagedserve.step.decode_tokens"] >= 1 for s in steps[1:])
    # Nothing per token: the request's whole trace is its four spans.
    in_trace = [s for s in spans if s.context.trace_id == client_span.context.trace_id]
    assert len(in_trace) == 5  # client, server, queue, prefill, decode


async def test_async_client_complete_and_chat_are_traced(fresh: TracedServer) -> None:
    async with AsyncGenerationClient(fresh.address, tracer_provider=fresh.provider) as client:
        response = await client.complete(
            messages=[{"role": "user", "content": "Hi"}], max_tokens=3, ignore_eos=True
        )
    spans = fresh.spans(servers=1)
    client_span = next(s for s in by_name(spans, COMPLETE) if s.kind == SpanKind.CLIENT)
    server_span = next(s for s in by_name(spans, COMPLETE) if s.kind == SpanKind.SERVER)
    assert server_span.parent.span_id == client_span.context.span_id
    assert server_span.attributes["gen_ai.operation.name"] == "chat"
    assert server_span.attributes["gen_ai.request.stream"] is False
    assert server_span.attributes["gen_ai.usage.output_tokens"] == response.usage.completion_tokens == 3
    assert client_span.attributes["gen_ai.usage.output_tokens"] == 3
    assert set(children(spans, server_span)) == {"queue", "prefill", "decode"}


def test_chunked_prefill_counts_chunks(fresh: TracedServer) -> None:
    budget = fresh.server.state.engine.engine.config.scheduler.max_num_batched_tokens
    prompt = [random.Random(0).randrange(100, 40000) for _ in range(budget + budget // 2)]
    with GenerationClient(fresh.address) as client:
        client.complete(prompt_token_ids=prompt, max_tokens=2, ignore_eos=True)
    spans = fresh.spans(servers=1)
    server_span = _one(spans, COMPLETE)
    assert server_span.parent is None  # no client span: the server trace starts here
    prefill = children(spans, server_span)["prefill"]
    assert prefill.attributes["pagedserve.prefill.chunks"] == 2
    assert prefill.attributes["gen_ai.usage.input_tokens"] == len(prompt)
    assert len(steps_linking(spans, server_span)) == 2 + 1  # two chunks, one decode


@pytest.fixture(scope="module")
def slow(traced: TracedServer) -> SlowSteps:
    return SlowSteps(traced.server, SLOW_STEP_S)


def test_cancelled_stream_ends_with_cancelled_status(fresh: TracedServer, slow: SlowSteps) -> None:
    with GenerationClient(fresh.address, tracer_provider=fresh.provider) as client, slow.on():
        call = client.generate("Long story", max_tokens=300, ignore_eos=True, request_id="cx")
        stream = iter(call)
        streamed = sum(len(next(stream).token_ids) for _ in range(3))
        call.cancel()
        wait_for(lambda: all_blocks_free(client), FREE_TIMEOUT_S, "blocks after cancel")
    spans = fresh.spans(servers=1)
    server_span = next(s for s in by_name(spans, GENERATE) if s.kind == SpanKind.SERVER)
    client_span = next(s for s in by_name(spans, GENERATE) if s.kind == SpanKind.CLIENT)
    for span in (server_span, client_span):
        assert span.status.status_code == StatusCode.ERROR
        assert span.attributes["error.type"] == "CANCELLED"
        assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    a = server_span.attributes
    assert a["gen_ai.response.finish_reasons"] == ("abort",)
    assert streamed <= a["gen_ai.usage.output_tokens"] < 300
    phases = children(spans, server_span)
    assert set(phases) == {"queue", "prefill", "decode"}
    _assert_phases_tile(server_span, phases)
    assert phases["decode"].status.status_code == StatusCode.ERROR
    assert phases["decode"].attributes["error.type"] == "CANCELLED"
    assert phases["prefill"].status.status_code == StatusCode.UNSET
    assert len(steps_linking(spans, server_span)) >= 3


def test_deadline_sets_deadline_exceeded(fresh: TracedServer, slow: SlowSteps) -> None:
    with GenerationClient(fresh.address) as client, slow.on():
        with pytest.raises(grpc.RpcError) as info:
            client.complete("Long story", max_tokens=300, ignore_eos=True, timeout=0.3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: all_blocks_free(client), FREE_TIMEOUT_S, "blocks after the deadline")
    server_span = _one(fresh.spans(servers=1), COMPLETE)
    assert server_span.attributes["error.type"] == "DEADLINE_EXCEEDED"
    assert server_span.status.status_code == StatusCode.ERROR
    assert server_span.attributes["gen_ai.response.finish_reasons"] == ("abort",)


@pytest.fixture
def poisoned(fresh: TracedServer) -> Iterator[str]:
    """Output processing raises for one request id, inside the real engine step."""
    output = fresh.server.state.engine.engine.output
    original = output.process_token
    poison_id = "poisoned"

    def process_token(request: Any, *args: Any, **kwargs: Any) -> Any:
        if request.request_id == poison_id:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected failure")
        return original(request, *args, **kwargs)

    output.process_token = process_token
    yield poison_id
    output.process_token = original


def test_failed_request_is_internal_with_error_type(fresh: TracedServer, poisoned: str) -> None:
    with GenerationClient(fresh.address, tracer_provider=fresh.provider) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.complete("Hello", max_tokens=4, request_id=poisoned)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    spans = fresh.spans(servers=1)
    server_span = next(s for s in by_name(spans, COMPLETE) if s.kind == SpanKind.SERVER)
    assert server_span.attributes["error.type"] == "INTERNAL"
    assert server_span.status.status_code == StatusCode.ERROR
    assert "injected failure" in (server_span.status.description or "")
    assert server_span.attributes["gen_ai.response.finish_reasons"] == ("error",)
    phases = children(spans, server_span)
    # It broke while processing its first token: the prefill ran, the decode failed at once.
    assert set(phases) == {"queue", "prefill", "decode"}
    assert phases["prefill"].status.status_code == StatusCode.UNSET
    assert phases["decode"].status.status_code == StatusCode.ERROR
    assert phases["decode"].attributes["error.type"] == "INTERNAL"
    client_span = next(s for s in by_name(spans, COMPLETE) if s.kind == SpanKind.CLIENT)
    assert client_span.attributes["error.type"] == "INTERNAL"


def test_refused_request_ends_at_once_without_phases(fresh: TracedServer) -> None:
    with GenerationClient(fresh.address) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.complete("Hello", max_tokens=4, temperature=-1.0)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    spans = fresh.spans(servers=1)  # no wait for an engine final: it never entered the engine
    server_span = _one(spans, COMPLETE)
    assert server_span.attributes["error.type"] == "INVALID_ARGUMENT"
    assert "gen_ai.usage.output_tokens" not in server_span.attributes
    assert children(spans, server_span) == {}
    assert steps_linking(spans, server_span) == []


def test_an_unset_max_tokens_is_not_recorded_as_a_request_attribute(fresh: TracedServer) -> None:
    """The client sent no max_tokens: the span says nothing it did not ask for (the server's
    default still bounds the output)."""
    with GenerationClient(fresh.address) as client:
        reply = client.complete("Hello", ignore_eos=True)
    assert reply.usage.completion_tokens > 0
    server_span = _one(fresh.spans(servers=1), COMPLETE)
    assert "gen_ai.request.max_tokens" not in server_span.attributes
    assert server_span.attributes["gen_ai.usage.output_tokens"] == reply.usage.completion_tokens


def test_concurrent_requests_share_steps_through_links(fresh_either: TracedServer) -> None:
    fresh = fresh_either
    count = 4
    with GenerationClient(fresh.address) as client:
        threads = [
            threading.Thread(
                target=client.complete, args=(f"Request {i}",),
                kwargs=dict(max_tokens=MAX_TOKENS, ignore_eos=True, request_id=f"c{i}"),
            )
            for i in range(count)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    spans = fresh.spans(servers=count)
    servers = by_name(spans, COMPLETE)
    assert len(servers) == count
    for server_span in servers:
        assert len(steps_linking(spans, server_span)) == MAX_TOKENS
    linked = {l.context.span_id for s in by_name(spans, "engine.step") for l in s.links}
    assert linked == {s.context.span_id for s in servers}
    batched = [s for s in by_name(spans, "engine.step") if len(s.links) > 1]
    assert batched, "concurrent requests never shared a step"
    for step in batched:
        assert step.attributes["pagedserve.step.batch_size"] >= len(step.links)


def test_preemptions_are_events_on_the_phase_they_interrupted(tiny_llama_dir: Path) -> None:
    # 12 blocks of 16 tokens cannot hold two requests of 20 + 100 tokens: one is preempted.
    with traced_server(
        tiny_llama_dir, num_blocks=12, max_num_seqs=2, max_num_batched_tokens=64
    ) as server, GenerationClient(server.address) as client:
        threads = [
            threading.Thread(
                target=client.complete, args=(f"Preempt me {i} " * 4,),
                kwargs=dict(max_tokens=100, ignore_eos=True),
            )
            for i in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        spans = server.spans(servers=2)
    servers = by_name(spans, COMPLETE)
    assert len(servers) == 2
    total = 0
    for server_span in servers:
        assert server_span.attributes["gen_ai.usage.output_tokens"] == 100
        preemptions = server_span.attributes["pagedserve.preemptions"]
        phases = children(spans, server_span)
        events = [e for p in phases.values() for e in p.events if e.name == "preempted"]
        assert len(events) == preemptions
        for phase in phases.values():
            for event in phase.events:
                assert phase.start_time <= event.timestamp <= phase.end_time
        total += preemptions
    assert total >= 1
    assert sum(s.attributes["pagedserve.step.preempted"] for s in by_name(spans, "engine.step")) == total


def test_untraced_client_sends_no_traceparent(fresh: TracedServer) -> None:
    with GenerationClient(fresh.address) as client:  # the global provider: a no-op
        call = client.generate("Hi", max_tokens=2)
        assert not isinstance(call, TracedStream)
        list(call)
    spans = fresh.spans(servers=1)
    server_span = _one(spans, GENERATE)
    assert server_span.parent is None
    assert all(s.kind != SpanKind.CLIENT for s in spans)

