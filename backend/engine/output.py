"""Turning sampled token ids into text deltas, and deciding when a request stops.

The detokenizer decodes a short window of recent tokens and emits only what the window adds
over its prefix, so no delta ever holds part of a UTF-8 character (a window that decodes to a
trailing U+FFFD waits for the next token) and tokenizers that drop a leading space still join
correctly. Stop strings are searched across token boundaries; while a request has stop strings,
the last ``len(longest stop) - 1`` characters are held back, so text that turns out to be a stop
string is never streamed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenizers.decoders import DecodeStream

from pagedserve.backend.engine.request import (
    FinishReason,
    Request,
    RequestOutputDelta,
    TokenLogprob,
    Usage,
)

REPLACEMENT_CHAR = "\ufffd"


def _fast_decoder(tokenizer: Any) -> Any:
    """The Rust tokenizer behind a fast transformers tokenizer when decoding through it gives
    the same text: it runs twice per token of every request, and the Python wrapper costs
    several times the decode itself. Otherwise the transformers tokenizer."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return tokenizer
    return backend


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self._decoder = _fast_decoder(tokenizer)
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        # The Rust tokenizer's own incremental decoder runs the same window algorithm in one
        # call per token, half the cost of the two decodes below. Our offsets follow its
        # emissions, so ``flush`` (and the fallback, should it refuse a token) carry on from them.
        self._stream: Any = None
        if self._decoder is not tokenizer:
            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def _decode(self, ids: list[int]) -> str:
        return self._decoder.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly empty)."""
        self.tokens.append(token_id)
        if self._stream is not None:
            try:
                text = self._stream.step(self._decoder, token_id)
            except Exception:  # e.g. a decoder whose longer window rewrites earlier text
                self._stream = None
            else:
                if text is None:
                    return ""
                self.prefix_offset = self.read_offset
                self.read_offset = len(self.tokens)
                return text
        prefix_text = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.tokens[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.tokens)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """At the end, whatever is still pending (an incomplete character decodes to U+FFFD)."""
        if self.read_offset == len(self.tokens):
            return ""
        prefix_text = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.tokens[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.tokens)
        return new_text[len(prefix_text) :]


@dataclass
class OutputState:
    """Per-request text state kept by the engine while the request lives."""

    detokenizer: IncrementalDetokenizer
    # Per-request constants, computed once: this runs for every token of every request.
    hold: int  # characters held back while they could still start a stop string
    stop_token_ids: frozenset[int]
    # Decoded text not sent yet: at most ``hold`` characters between tokens. Only this tail is
    # kept (a stop string can only begin in it), so a token costs the same at any length.
    pending: str = ""


class OutputProcessor:
    """Stateless but for the tokenizer: each request's output state lives on the request."""

    def __init__(self, tokenizer: Any, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len

    def start(self, request: Request) -> None:
        """Give a newly admitted request its detokenizer and stop-string state."""
        params = request.params
        request.output = OutputState(
            detokenizer=IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens),
            hold=max((len(s) for s in params.stop), default=1) - 1,
            stop_token_ids=frozenset(params.stop_token_ids),
        )

    def process_token(
        self, request: Request, token_id: int, logprob: TokenLogprob | None
    ) -> RequestOutputDelta:
        """Record a sampled token; decide whether the request is done; return its delta.

        Sets ``request.finish_reason`` when it stops; the engine then finishes it.
        """
        state = request.output
        assert state is not None, "process_token before start"
        params = request.params
        request.output_token_ids.append(token_id)
        num_out = len(request.output_token_ids)
        stop_reason: str | int | None = None
        truncate_at: int | None = None

        if not params.ignore_eos and token_id in request.eos_token_ids and num_out > params.min_tokens:
            request.finish_reason = FinishReason.STOP
        elif token_id in state.stop_token_ids and num_out > params.min_tokens:
            request.finish_reason = FinishReason.STOP
            stop_reason = token_id
        elif params.detokenize:
            delta = state.detokenizer.add(token_id)
            state.pending += delta
            if params.stop and delta and num_out >= params.min_tokens:
                found = self._find_stop(state.pending, len(delta), params.stop)
                if found is not None:
                    idx, stop = found
                    request.finish_reason = FinishReason.STOP
                    stop_reason = stop
                    truncate_at = idx + len(stop) if params.include_stop_str_in_output else idx

        if request.finish_reason is None:
            if num_out >= params.max_tokens or request.num_tokens >= self.max_model_len:
                request.finish_reason = FinishReason.LENGTH

        if request.finish_reason is not None:
            if truncate_at is not None:
                state.pending = state.pending[:truncate_at]
            elif params.detokenize:
                state.pending += state.detokenizer.flush()
            text, state.pending = state.pending, ""
        else:
            cut = max(0, len(state.pending) - state.hold)
            text, state.pending = state.pending[:cut], state.pending[cut:]
        return RequestOutputDelta(
            request_id=request.request_id,
            text=text,
            token_ids=[token_id],
            logprobs=[logprob] if logprob is not None else None,
            finished=request.finish_reason is not None,
            finish_reason=request.finish_reason,
            stop_reason=stop_reason,
        )

    @staticmethod
    def _find_stop(text: str, new_chars: int, stops: list[str]) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in stops:
            start = max(0, len(text) - new_chars - len(stop) + 1)
            idx = text.find(stop, start)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        return best

    def final_fields(self, request: Request, delta: RequestOutputDelta) -> RequestOutputDelta:
        """Attach usage, timings and preemption count to a request's last delta."""
        delta.usage = Usage(
            prompt_tokens=request.num_prompt_tokens,
            completion_tokens=len(request.output_token_ids),
            cached_prompt_tokens=max(request.num_cached_prompt_tokens, 0),
        )
        delta.times = request.times
        delta.num_preemptions = request.num_preemptions
        delta.num_prefill_chunks = request.num_prefill_chunks
        return delta
