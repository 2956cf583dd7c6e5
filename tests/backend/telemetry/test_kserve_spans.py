"""KServe requests are traced as native ones are: a SERVER span per request, child of the
caller's ``traceparent``, with the same queue/prefill/decode children and attributes."""

from __future__ import annotations

import grpc
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode
from tritonclient.grpc import service_pb2 as triton_service
from tritonclient.grpc import service_pb2_grpc as triton_service_grpc

from pagedserve.clients.client import GenerationClient
from tests.backend.telemetry.conftest import TracedServer, by_name, children

GENERATE = "pagedserve.v1.GenerationService/Generate"
STREAM_INFER = "inference.GRPCInferenceService/ModelStreamInfer"
MODEL_INFER = "inference.GRPCInferenceService/ModelInfer"
MAX_TOKENS = 4
TIMEOUT_S = 60.0
# Attributes that name the method or the request: the only ones that may differ.
_PER_CALL = {"rpc.service", "rpc.method", "gen_ai.response.id", "gen_ai.request.stream"}


def _request(model: str, request_id: str, *, stream: bool, prompt: bytes = b"Tell me") -> object:
    request = triton_service.ModelInferRequest(model_name=model, id=request_id)
    text = request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    text.contents.bytes_contents.append(prompt)
    sampling = request.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1])
    sampling.contents.bytes_contents.append(
        f'{{"max_tokens": {MAX_TOKENS}, "ignore_eos": true, "temperature": 0}}'.encode()
    )
    if stream:
        flag = request.inputs.add(name="stream", datatype="BOOL", shape=[1])
        flag.contents.bool_contents.append(True)
    return request


def _server_span(spans: list[ReadableSpan], name: str, client: ReadableSpan) -> ReadableSpan:
    found = [
        s for s in by_name(spans, name)
        if s.kind == SpanKind.SERVER and s.parent is not None
        and s.parent.span_id == client.context.span_id
    ]
    assert len(found) == 1, [s.name for s in spans]
    span = found[0]
    assert span.parent is not None and span.parent.is_remote
    assert span.context.trace_id == client.context.trace_id
    return span


def _shape(spans: list[ReadableSpan], server: ReadableSpan) -> tuple[set[str], set[str]]:
    """What a request's tree has: its phase children and its SERVER span's attribute names."""
    phases = children(spans, server)
    for phase in phases.values():
        assert phase.kind == SpanKind.INTERNAL
        assert server.start_time <= phase.start_time <= phase.end_time <= server.end_time
    return set(phases), set(server.attributes or {}) - _PER_CALL


def test_kserve_requests_have_the_native_span_tree(fresh: TracedServer) -> None:
    model = fresh.server.state.served_model_name
    tracer = trace.get_tracer("test", tracer_provider=fresh.provider)
    with GenerationClient(fresh.address, tracer_provider=fresh.provider) as native:
        list(native.generate("Tell me", max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0))
    with grpc.insecure_channel(fresh.address) as channel:
        stub = triton_service_grpc.GRPCInferenceServiceStub(channel)
        with tracer.start_as_current_span("stream client", kind=SpanKind.CLIENT) as stream_client:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            requests = [_request(model, "a", stream=True), _request(model, "b", stream=False)]
            responses = list(
                stub.ModelStreamInfer(iter(requests), metadata=list(carrier.items()),
                                      timeout=TIMEOUT_S)
            )
        assert not [r.error_message for r in responses if r.error_message]
        with tracer.start_as_current_span("unary client", kind=SpanKind.CLIENT) as unary_client:
            carrier = {}
            propagate.inject(carrier)
            stub.ModelInfer(_request(model, "c", stream=False), metadata=list(carrier.items()),
                            timeout=TIMEOUT_S)
    spans = fresh.spans(servers=4)

    generate_client = next(s for s in by_name(spans, GENERATE) if s.kind == SpanKind.CLIENT)
    generate = _server_span(spans, GENERATE, generate_client)
    expected = _shape(spans, generate)
    assert expected[0] == {"queue", "prefill", "decode"}

    # One SERVER span per request of the stream, both children of the stream's caller.
    stream_spans = [
        s for s in by_name(spans, STREAM_INFER)
        if s.parent is not None and s.parent.span_id == stream_client.get_span_context().span_id
    ]
    assert len(stream_spans) == 2
    stream_ids = {s.attributes["gen_ai.response.id"] for s in stream_spans}
    assert len(stream_ids) == 2
    unary = [
        s for s in by_name(spans, MODEL_INFER)
        if s.parent is not None and s.parent.span_id == unary_client.get_span_context().span_id
    ]
    assert len(unary) == 1
    for span in [*stream_spans, *unary]:
        assert span.kind == SpanKind.SERVER and span.parent is not None and span.parent.is_remote
        assert _shape(spans, span) == expected, span.name
        a = span.attributes
        assert a["rpc.system"] == "grpc" and a["rpc.service"] == "inference.GRPCInferenceService"
        assert a["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
        assert a["gen_ai.request.max_tokens"] == MAX_TOKENS
        assert a["gen_ai.usage.output_tokens"] == MAX_TOKENS
        assert a["gen_ai.response.finish_reasons"] == ("length",)
    streamed = {s.attributes["gen_ai.request.stream"] for s in stream_spans}
    assert streamed == {True, False}


def test_a_refused_stream_request_ends_its_span_with_its_in_band_status(
    fresh: TracedServer,
) -> None:
    model = fresh.server.state.served_model_name
    bad = triton_service.ModelInferRequest(model_name=model, id="no-text")
    with grpc.insecure_channel(fresh.address) as channel:
        stub = triton_service_grpc.GRPCInferenceServiceStub(channel)
        responses = list(
            stub.ModelStreamInfer(iter([bad, _request(model, "good", stream=True)]),
                                  timeout=TIMEOUT_S)
        )
    assert [r.infer_response.id for r in responses if r.error_message] == ["no-text"]
    spans = by_name(fresh.spans(servers=2), STREAM_INFER)
    failed = [s for s in spans if s.status.status_code == StatusCode.ERROR]
    assert len(failed) == 1 and len(spans) == 2
    a = failed[0].attributes
    assert a["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert a["error.type"] == "INVALID_ARGUMENT"
    assert "text_input" in (failed[0].status.description or "")
