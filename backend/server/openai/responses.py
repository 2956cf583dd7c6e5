"""OpenAI's response and chunk objects, written from the engine's deltas.

One renderer per endpoint turns a choice's delta into its JSON choice object. Streaming, each
delta becomes a chunk; otherwise a choice's deltas are joined first and rendered once, so the
two shapes carry the same text, logprobs and finish reason by construction.

Logprobs come in the two shapes OpenAI defined: completions' parallel lists (``tokens``,
``token_logprobs``, ``top_logprobs`` as token -> logprob with the chosen token included,
``text_offset``), and chat's list of ``{token, logprob, bytes, top_logprobs}``. A token's text
is that token decoded alone (a token holding part of a character shows U+FFFD, and ``bytes``
are that text's UTF-8), as vLLM reports it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from pagedserve.backend.engine.request import FinishReason, RequestOutputDelta, TokenLogprob
from pagedserve.backend.server.openai import sse
from pagedserve.backend.server.openai.errors import ApiError

_FINISH_REASONS: Mapping[FinishReason, str] = {
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
}
ABORTED = "the request was aborted: the server is shutting down"


class TokenTexts:
    """Each token's text, decoded once per server (a vocabulary is bounded)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._texts[token_id] = text
        return text


def joined(deltas: Sequence[RequestOutputDelta]) -> RequestOutputDelta:
    """A choice's deltas as one (text and tokens joined, the final fields of the last)."""
    last = deltas[-1]
    logprobs = None
    if last.logprobs is not None:
        logprobs = [lp for d in deltas for lp in d.logprobs or ()]
    return RequestOutputDelta(
        last.request_id,
        "".join(d.text for d in deltas),
        [t for d in deltas for t in d.token_ids],
        logprobs,
        last.finished,
        last.finish_reason,
        last.stop_reason,
        last.usage,
        last.error,
    )


def finish_reason(delta: RequestOutputDelta) -> str | None:
    """OpenAI's finish reason; an aborted or failed request is an error, not a finish."""
    if not delta.finished:
        return None
    if delta.finish_reason is FinishReason.ABORT:
        raise ApiError(HTTPStatus.SERVICE_UNAVAILABLE, ABORTED)
    if delta.finish_reason is FinishReason.ERROR or delta.finish_reason is None:
        raise ApiError(
            HTTPStatus.INTERNAL_SERVER_ERROR, f"request {delta.request_id} failed: {delta.error}"
        )
    return _FINISH_REASONS[delta.finish_reason]


def _finish_fields(delta: RequestOutputDelta) -> dict[str, Any]:
    # stop_reason (vLLM's): the stop string or token id that ended the choice, if one did.
    return {"finish_reason": finish_reason(delta), "stop_reason": delta.stop_reason}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# Marks of a streamed chunk's template: an index no request has, a text no token decodes to.
_INDEX_MARK = 987_654_321_123
_TEXT_MARK = "\x00pagedserve text\x00"


class Renderer:
    """What both endpoints' objects share: the id, creation time and model of the response."""

    object: str
    chunk_object: str

    def __init__(self, response_id: str, model: str, created: int, texts: TokenTexts) -> None:
        self.response_id = response_id
        self.model = model
        self.created = created
        self.texts = texts
        self._templates: dict[bool, tuple[bytes, bytes, bytes] | None] = {}

    def envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.response_id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def chunk(self, choices: list[dict[str, Any]], with_usage: bool) -> dict[str, Any]:
        """A streamed chunk; with ``include_usage`` every chunk but the last has usage null."""
        chunk = self.envelope(self.chunk_object, choices)
        if with_usage:
            chunk["usage"] = None
        return chunk

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        chunk = self.envelope(self.chunk_object, [])
        chunk["usage"] = usage(prompt_tokens, completion_tokens)
        return chunk

    def response(
        self, choices: list[dict[str, Any]], prompt_tokens: int, completion_tokens: int
    ) -> dict[str, Any]:
        response = self.envelope(self.object, choices)
        response["usage"] = usage(prompt_tokens, completion_tokens)
        return response

    def opening(self) -> list[dict[str, Any]]:
        """Choice objects streamed before any token (chat's role, an echoed prompt)."""
        return []

    @property
    def asks_logprobs(self) -> bool:
        raise NotImplementedError

    def stream_chunk(self, index: int, delta: RequestOutputDelta, with_usage: bool) -> bytes:
        """The SSE event of a streamed ``delta``. Almost every one carries text only (no
        logprobs, not the last): that one is spliced into the bytes of the same chunk built
        once with marks for its index and text, so it costs a ``json.dumps`` of its text
        instead of the whole chunk's (3-5 µs a chunk instead of 16 on the development machine)."""
        if not (delta.finished or delta.logprobs or self.asks_logprobs):
            template = self._templates.get(with_usage)
            if template is None:
                template = self._templates[with_usage] = self._template(with_usage)
            if template:
                head, middle, tail = template
                text = json.dumps(delta.text, ensure_ascii=False).encode()
                return b"".join((head, str(index).encode(), middle, text, tail))
        return sse.encode(self.chunk([self.choice(index, delta, whole=False)], with_usage))

    def _template(self, with_usage: bool) -> tuple[bytes, bytes, bytes] | None:
        """A plain chunk's bytes around its index and its text (None where the marks are not
        found exactly once: then every chunk is encoded whole)."""
        probe = RequestOutputDelta("", _TEXT_MARK, [])
        encoded = sse.encode(self.chunk([self.choice(_INDEX_MARK, probe, whole=False)], with_usage))
        index_mark = str(_INDEX_MARK).encode()
        text_mark = json.dumps(_TEXT_MARK, ensure_ascii=False).encode()
        if encoded.count(index_mark) != 1 or encoded.count(text_mark) != 1:
            return None
        head, rest = encoded.split(index_mark)
        middle, tail = rest.split(text_mark)
        if not middle:  # the text came before the index: not a layout this splices
            return None
        return head, middle, tail

    def choice(self, index: int, delta: RequestOutputDelta, whole: bool) -> dict[str, Any]:
        """The choice object of ``delta``; ``whole``: the choice's joined deltas, unstreamed."""
        raise NotImplementedError


class CompletionRenderer(Renderer):
    object = "text_completion"
    chunk_object = "text_completion"

    def __init__(
        self,
        response_id: str,
        model: str,
        created: int,
        texts: TokenTexts,
        *,
        logprobs: int | None,
        echoed: Sequence[str] | None,
    ) -> None:
        """``echoed``: each choice's prompt text, to put before its completion."""
        super().__init__(response_id, model, created, texts)
        self._logprobs = logprobs
        self._echoed = echoed
        # Each choice's text length so far: where its next token's text starts.
        self._offsets: dict[int, int] = {}

    @property
    def asks_logprobs(self) -> bool:
        return self._logprobs is not None

    def _start(self, index: int) -> int:
        if index not in self._offsets:
            self._offsets[index] = len(self._echoed[index]) if self._echoed else 0
        return self._offsets[index]

    def opening(self) -> list[dict[str, Any]]:
        if not self._echoed:
            return []
        for index in range(len(self._echoed)):
            self._start(index)
        return [
            {"index": i, "text": text, "logprobs": None, "finish_reason": None, "stop_reason": None}
            for i, text in enumerate(self._echoed)
        ]

    def choice(self, index: int, delta: RequestOutputDelta, whole: bool) -> dict[str, Any]:
        text = delta.text
        if whole and self._echoed:
            text = self._echoed[index] + text
        return {
            "index": index,
            "text": text,
            "logprobs": self._logprobs_of(index, delta),
            **_finish_fields(delta),
        }

    def _logprobs_of(self, index: int, delta: RequestOutputDelta) -> dict[str, Any] | None:
        if self._logprobs is None:
            return None
        offset = self._start(index)
        tokens, chosen, tops, offsets = [], [], [], []
        for lp in delta.logprobs or ():
            text = self.texts(lp.token_id)
            tokens.append(text)
            chosen.append(lp.logprob)
            top = {self.texts(t): v for t, v in lp.top}
            top.setdefault(text, lp.logprob)  # OpenAI: the sampled token is always there
            tops.append(top)
            offsets.append(offset)
            offset += len(text)
        self._offsets[index] = offset
        return {
            "tokens": tokens,
            "token_logprobs": chosen,
            "top_logprobs": tops,
            "text_offset": offsets,
        }


class ChatRenderer(Renderer):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(
        self,
        response_id: str,
        model: str,
        created: int,
        texts: TokenTexts,
        *,
        logprobs: bool,
        num_choices: int,
    ) -> None:
        super().__init__(response_id, model, created, texts)
        self._logprobs = logprobs
        self._num_choices = num_choices

    @property
    def asks_logprobs(self) -> bool:
        return self._logprobs

    def opening(self) -> list[dict[str, Any]]:
        """The assistant's role first, for every choice (as OpenAI streams it)."""
        return [
            {
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            for i in range(self._num_choices)
        ]

    def choice(self, index: int, delta: RequestOutputDelta, whole: bool) -> dict[str, Any]:
        content: dict[str, Any] = (
            {"role": "assistant", "content": delta.text} if whole else {"content": delta.text}
        )
        logprobs = None
        if self._logprobs:
            logprobs = {"content": [self._token(lp) for lp in delta.logprobs or ()]}
        return {
            "index": index,
            "message" if whole else "delta": content,
            "logprobs": logprobs,
            **_finish_fields(delta),
        }

    def _token(self, lp: TokenLogprob) -> dict[str, Any]:
        text = self.texts(lp.token_id)
        return {
            "token": text,
            "logprob": lp.logprob,
            "bytes": list(text.encode("utf-8")),
            "top_logprobs": [
                {"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))}
                for t, v in ((self.texts(i), v) for i, v in lp.top)
            ],
        }
