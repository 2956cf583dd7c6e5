"""The OpenAI-compatible API's request spans: parented on the ``traceparent`` header exactly as
gRPC's are on metadata, with the same GenAI attributes and phase children, the HTTP status, and
no span for a request the API key refuses."""

from __future__ import annotations

import openai
import pytest
from opentelemetry import propagate
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode, set_span_in_context

from tests.backend.telemetry.conftest import TracedServer, by_name, children, steps_linking

COMPLETIONS = "POST /v1/completions"
CHAT = "POST /v1/chat/completions"
MAX_TOKENS = 5


def _client(server: TracedServer) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://{server.server.http_address}/v1", api_key="unused", max_retries=0,
        timeout=60.0,
    )


def _server_span(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    (span,) = [s for s in by_name(spans, name) if s.kind == SpanKind.SERVER]
    return span


@pytest.mark.parametrize("stream", [False, True])
def test_traceparent_parents_the_request_span(fresh: TracedServer, stream: bool) -> None:
    tracer = fresh.provider.get_tracer("test-client")
    model = fresh.server.state.served_model_name
    with tracer.start_as_current_span("caller", kind=SpanKind.CLIENT) as caller:
        headers: dict[str, str] = {}
        propagate.inject(headers, context=set_span_in_context(caller))
        with _client(fresh) as oai:
            result = oai.completions.create(
                model=model, prompt="Tell me", max_tokens=MAX_TOKENS, temperature=0.5, seed=7,
                stream=stream, extra_headers=headers, extra_body={"ignore_eos": True},
            )
            if stream:
                list(result)
    spans = fresh.spans(servers=1)
    server_span = _server_span(spans, COMPLETIONS)
    # The same parenting as gRPC metadata gives: the caller's span, remote, one trace.
    assert server_span.parent is not None and server_span.parent.is_remote
    assert server_span.parent.span_id == caller.get_span_context().span_id
    assert server_span.context.trace_id == caller.get_span_context().trace_id

    a = server_span.attributes
    assert a["http.request.method"] == "POST" and a["http.route"] == "/v1/completions"
    assert a["http.response.status_code"] == 200 and a["url.scheme"] == "http"
    assert "rpc.grpc.status_code" not in a and "error.type" not in a
    assert a["gen_ai.operation.name"] == "text_completion"
    assert a["gen_ai.request.stream"] is stream
    assert a["gen_ai.request.max_tokens"] == MAX_TOKENS
    assert a["gen_ai.request.seed"] == 7
    assert a["gen_ai.response.finish_reasons"] == ("length",)
    assert a["gen_ai.usage.output_tokens"] == MAX_TOKENS
    assert str(a["gen_ai.response.id"]).startswith("cmpl-")
    assert server_span.status.status_code == StatusCode.UNSET
    assert set(children(spans, server_span)) == {"queue", "prefill", "decode"}
    assert len(steps_linking(spans, server_span)) == MAX_TOKENS


def test_a_chat_without_traceparent_starts_its_trace(fresh: TracedServer) -> None:
    with _client(fresh) as oai:
        oai.chat.completions.create(
            model=fresh.server.state.served_model_name, max_tokens=2,
            messages=[{"role": "user", "content": "Hi"}], extra_body={"ignore_eos": True},
        )
    server_span = _server_span(fresh.spans(servers=1), CHAT)
    assert server_span.parent is None
    assert server_span.attributes["gen_ai.operation.name"] == "chat"


def test_a_refused_request_has_its_status_on_the_span(fresh: TracedServer) -> None:
    with _client(fresh) as oai, pytest.raises(openai.BadRequestError):
        oai.completions.create(
            model=fresh.server.state.served_model_name, prompt="Hi", temperature=-1
        )
    server_span = _server_span(fresh.spans(servers=1), COMPLETIONS)
    a = server_span.attributes
    assert a["http.response.status_code"] == 400 and a["error.type"] == "400"
    assert server_span.status.status_code == StatusCode.ERROR
    assert "temperature" in (server_span.status.description or "")
    assert children(fresh.spans(), server_span) == {}
