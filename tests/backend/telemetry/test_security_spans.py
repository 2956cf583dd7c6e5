"""Tracing behind the API key: an authorized call is traced as without a key; a refused one
never reaches a service and leaves no SERVER span; the key is in no span."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

from pagedserve.clients.client import GenerationClient
from tests.backend.telemetry.conftest import by_name, children, traced_server

KEY = "tr4ced-server-key"
GENERATE = "pagedserve.v1.GenerationService/Generate"
COMPLETE = "pagedserve.v1.GenerationService/Complete"
MAX_TOKENS = 4


def _values(spans: list[ReadableSpan]) -> str:
    return repr([(dict(s.attributes or {}), [e.attributes for e in s.events]) for s in spans])


def test_authorized_calls_are_traced_and_refused_ones_leave_no_server_span(
    tiny_llama_dir: Path,
) -> None:
    with traced_server(tiny_llama_dir, server_options={"api_key": KEY}) as traced:
        with GenerationClient(
            traced.address, api_key=KEY, tracer_provider=traced.provider
        ) as client:
            responses = list(
                client.generate("Hello", max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0.0)
            )
        assert sum(len(r.token_ids) for r in responses) == MAX_TOKENS
        spans = traced.spans(servers=1)
        client_span = next(s for s in by_name(spans, GENERATE) if s.kind == SpanKind.CLIENT)
        server_span = next(s for s in by_name(spans, GENERATE) if s.kind == SpanKind.SERVER)
        assert server_span.parent is not None
        assert server_span.parent.span_id == client_span.context.span_id
        assert server_span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
        assert set(children(spans, server_span)) == {"queue", "prefill", "decode"}
        assert KEY[:8] not in _values(spans)
        traced.exporter.clear()

        with GenerationClient(
            traced.address, api_key=KEY[:-1], tracer_provider=traced.provider
        ) as wrong:
            with pytest.raises(grpc.RpcError) as streamed:
                list(wrong.generate("Hello", max_tokens=MAX_TOKENS))
            with pytest.raises(grpc.RpcError) as whole:
                wrong.complete("Hello", max_tokens=MAX_TOKENS)
        assert streamed.value.code() == whole.value.code() == grpc.StatusCode.UNAUTHENTICATED
        spans = traced.spans()
        assert not [s for s in spans if s.kind == SpanKind.SERVER]
        # The client's own spans say what happened.
        refused = {s.name: s for s in spans if s.kind == SpanKind.CLIENT}
        assert set(refused) == {GENERATE, COMPLETE}
        for span in refused.values():
            assert span.attributes["error.type"] == "UNAUTHENTICATED"
        assert KEY[:8] not in _values(spans)
