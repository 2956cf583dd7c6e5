"""Streamed chunks spliced into a template are byte for byte the chunks encoded whole."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pagedserve.backend.engine.request import FinishReason, RequestOutputDelta, TokenLogprob
from pagedserve.backend.server.openai import sse
from pagedserve.backend.server.openai.responses import ChatRenderer, CompletionRenderer, Renderer


def renderers(model: str) -> list[Renderer]:
    texts = str  # token id -> text, enough for logprob rendering here
    return [
        CompletionRenderer("cmpl-1", model, 1_700_000_000, texts, logprobs=None, echoed=None),
        CompletionRenderer("cmpl-2", model, 1_700_000_000, texts, logprobs=2, echoed=None),
        ChatRenderer("chatcmpl-1", model, 1_700_000_000, texts, logprobs=False, num_choices=4),
        ChatRenderer("chatcmpl-2", model, 1_700_000_000, texts, logprobs=True, num_choices=4),
    ]


def whole(renderer: Renderer, index: int, delta: RequestOutputDelta, with_usage: bool) -> bytes:
    return sse.encode(renderer.chunk([renderer.choice(index, delta, whole=False)], with_usage))


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(st.characters(exclude_categories=("Cs",))),
    index=st.integers(0, 127),
    with_usage=st.booleans(),
    model=st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=20),
)
def test_plain_text_chunks_equal_whole_encoding(
    text: str, index: int, with_usage: bool, model: str
) -> None:
    delta = RequestOutputDelta("r", text, [5])
    # Twins: a renderer with logprobs keeps each choice's text offset, so each path gets its own.
    for renderer, twin in zip(renderers(model), renderers(model), strict=True):
        if renderer.asks_logprobs:
            delta.logprobs = [TokenLogprob(5, -0.5, [(5, -0.5), (6, -1.5)])]
        assert renderer.stream_chunk(index, delta, with_usage) == whole(
            twin, index, delta, with_usage
        )
        delta.logprobs = None


def test_last_chunks_are_encoded_whole_with_their_finish_reason() -> None:
    delta = RequestOutputDelta("r", "end", [5], finished=True, finish_reason=FinishReason.LENGTH)
    for renderer, twin in zip(renderers("m"), renderers("m"), strict=True):
        chunk = renderer.stream_chunk(1, delta, True)
        assert chunk == whole(twin, 1, delta, True)
        assert b'"finish_reason":"length"' in chunk
