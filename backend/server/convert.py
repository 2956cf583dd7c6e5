"""Protobuf <-> engine types for the generation service. No I/O, no tensors."""

from __future__ import annotations

from pagedserve.backend.engine.request import (
    FinishReason,
    RequestOutputDelta,
    TokenLogprob,
    Usage,
)
from pagedserve.backend.sampling_params import SamplingParams
from pagedserve.backend.server.translate import (
    Coercion,
    PromptInput,
    build_sampling_params,
    resolve_prompt,
)
from pagedserve.v1 import generation_pb2 as pb

# Sampling fields that are proto3 `optional`: passed on only when the client set them.
_OPTIONAL_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "max_tokens",
    "min_tokens",
    "ignore_eos",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "logprobs",
)
# Repeated fields have no presence; empty is their default anyway.
_REPEATED_SAMPLING_FIELDS = ("stop", "stop_token_ids")

_FINISH_REASONS = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}


def _sampling_values(request: pb.GenerateRequest) -> dict[str, object]:
    """The sampling fields the client set; unset ones are left to SamplingParams' defaults."""
    values: dict[str, object] = {
        name: getattr(request, name) for name in _OPTIONAL_SAMPLING_FIELDS if request.HasField(name)
    }
    values.update({name: list(getattr(request, name)) for name in _REPEATED_SAMPLING_FIELDS})
    return values


def sampling_params_from_proto(request: pb.GenerateRequest) -> SamplingParams:
    """SamplingParams from the request; validation is the engine's (it knows the vocabulary
    size). Protobuf has typed the values already."""
    return build_sampling_params(_sampling_values(request), coercion=Coercion.TYPED)


def prompt_input_from_proto(request: pb.GenerateRequest) -> PromptInput:
    """The `input` oneof in engine terms; the oneof itself keeps it to one form."""
    kind = request.WhichOneof("input")
    if kind == "prompt":
        return resolve_prompt(prompt=request.prompt)
    if kind == "prompt_token_ids":
        return resolve_prompt(prompt_token_ids=list(request.prompt_token_ids.ids))
    if kind == "messages":
        messages = [{"role": m.role, "content": m.content} for m in request.messages.messages]
        return resolve_prompt(messages=messages)
    return resolve_prompt()  # none set: refused, naming `input`


def _logprobs_to_proto(logprobs: list[TokenLogprob]) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=lp.token_id,
            logprob=lp.logprob,
            top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
        )
        for lp in logprobs
    ]


def _usage_to_proto(usage: Usage) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_prompt_tokens=usage.cached_prompt_tokens,
    )


def _set_finish(response: pb.GenerateResponse, delta: RequestOutputDelta) -> None:
    if delta.finish_reason is not None:
        response.finish_reason = _FINISH_REASONS[delta.finish_reason]
    if delta.usage is not None:
        response.usage.CopyFrom(_usage_to_proto(delta.usage))
    if isinstance(delta.stop_reason, str):
        response.stop_string = delta.stop_reason
    elif isinstance(delta.stop_reason, int):
        response.stop_token_id = delta.stop_reason


def delta_to_proto(request_id: str, delta: RequestOutputDelta) -> pb.GenerateResponse:
    """One streamed message: the delta's text and tokens, finish fields on the last one."""
    response = pb.GenerateResponse(
        request_id=request_id, text=delta.text, token_ids=delta.token_ids
    )
    if delta.logprobs:
        response.logprobs.extend(_logprobs_to_proto(delta.logprobs))
    if delta.finished:
        _set_finish(response, delta)
    return response


class CompletionAccumulator:
    """Folds a request's deltas into the single Complete response."""

    def __init__(self, request_id: str) -> None:
        self._request_id = request_id
        self._text: list[str] = []
        self._token_ids: list[int] = []
        self._logprobs: list[TokenLogprob] = []
        self._last: RequestOutputDelta | None = None

    def add(self, delta: RequestOutputDelta) -> None:
        self._text.append(delta.text)
        self._token_ids.extend(delta.token_ids)
        if delta.logprobs:
            self._logprobs.extend(delta.logprobs)
        self._last = delta

    def response(self) -> pb.GenerateResponse:
        response = pb.GenerateResponse(
            request_id=self._request_id, text="".join(self._text), token_ids=self._token_ids
        )
        response.logprobs.extend(_logprobs_to_proto(self._logprobs))
        if self._last is not None and self._last.finished:
            _set_finish(response, self._last)
        return response
