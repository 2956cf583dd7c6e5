"""End to end over OTLP/gRPC: a server started from its command-line flags exports to a
collector this test runs on loopback (TraceService/Export from opentelemetry-proto)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as otlp
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as otlp_grpc
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from pagedserve.backend.cli import build_parser, engine_config_from_args
from pagedserve.backend.server.cli import server_config_from_args
from pagedserve.backend.server.server import BackgroundServer
from pagedserve.backend.telemetry.exporting import new_tracer_provider
from pagedserve.clients.client import GenerationClient
from tests.backend.server.harness import READY_TIMEOUT_S, TINY_ENGINE

WAIT_S = 20.0
MAX_TOKENS = 7


class Sink(otlp_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, str], Span]] = []
        self.changed = threading.Condition()

    def Export(
        self, request: otlp.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> otlp.ExportTraceServiceResponse:
        with self.changed:
            for resource_spans in request.resource_spans:
                resource = {
                    a.key: a.value.string_value for a in resource_spans.resource.attributes
                }
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend((resource, s) for s in scope_spans.spans)
            self.changed.notify_all()
        return otlp.ExportTraceServiceResponse()


@pytest.fixture
def collector() -> Iterator[tuple[Sink, int]]:
    sink = Sink()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    otlp_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield sink, port
    server.stop(0)


def _attributes(span: Span) -> dict[str, object]:
    out: dict[str, object] = {}
    for a in span.attributes:
        kind = a.value.WhichOneof("value")
        out[a.key] = getattr(a.value, kind)
    return out


def test_server_exports_the_client_rooted_trace_over_otlp_grpc(
    tiny_llama_dir: Path, collector: tuple[Sink, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    sink, port = collector
    monkeypatch.setenv("OTEL_SERVICE_NAME", "pagedserve-e2e")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # ms; the default is 5 s
    engine_flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_ENGINE.items()]
    args = build_parser().parse_args([
        "serve", "--model", str(tiny_llama_dir), "--host", "127.0.0.1", "--port", "0", "--http-port", "0",
        "--metrics-port", "0", "--otlp-traces-endpoint", f"http://127.0.0.1:{port}",
        *engine_flags,
    ])
    client_exporter = InMemorySpanExporter()
    client_provider = new_tracer_provider(SimpleSpanProcessor(client_exporter))
    with BackgroundServer(server_config_from_args(args), engine_config_from_args(args)) as server:
        server.wait_ready(READY_TIMEOUT_S)
        assert server.state.telemetry.tracing
        with GenerationClient(server.address, tracer_provider=client_provider) as client:
            responses = list(client.generate("Once upon", max_tokens=MAX_TOKENS, ignore_eos=True))
        streamed = sum(len(r.token_ids) for r in responses)
        assert streamed == MAX_TOKENS
        (client_span,) = client_exporter.get_finished_spans()
        trace_id = client_span.context.trace_id.to_bytes(16, "big")

        def complete() -> bool:
            in_trace = [s for _, s in sink.spans if s.trace_id == trace_id]
            return len(in_trace) >= 4  # server, queue, prefill, decode

        with sink.changed:  # the batch processor exports on its own schedule
            assert sink.changed.wait_for(complete, WAIT_S), "the trace never reached the collector"
    # The server has drained and shut its exporter down: every step span has been sent too.
    in_trace = {s.name: (resource, s) for resource, s in sink.spans if s.trace_id == trace_id}
    assert set(in_trace) == {
        "pagedserve.v1.GenerationService/Generate", "queue", "prefill", "decode"
    }
    resource, server_span = in_trace["pagedserve.v1.GenerationService/Generate"]
    assert resource["service.name"] == "pagedserve-e2e"
    assert server_span.kind == Span.SPAN_KIND_SERVER
    # The client's span is the root; the server's span is its child.
    assert client_span.parent is None and client_span.kind == SpanKind.CLIENT
    assert server_span.parent_span_id == client_span.context.span_id.to_bytes(8, "big")
    attributes = _attributes(server_span)
    assert attributes["gen_ai.usage.output_tokens"] == streamed
    assert attributes["gen_ai.response.id"] == responses[0].request_id
    for name in ("queue", "prefill", "decode"):
        assert in_trace[name][1].parent_span_id == server_span.span_id
    steps = [
        s for _, s in sink.spans
        if s.name == "engine.step" and any(l.span_id == server_span.span_id for l in s.links)
    ]
    assert len(steps) == MAX_TOKENS
    assert all(l.trace_id == trace_id for s in steps for l in s.links if l.span_id == server_span.span_id)
