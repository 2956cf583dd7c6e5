"""``pagedserve.v1.GenerationService`` on grpc.aio: protobuf in, engine deltas out.

The native front in one module: which proto fields a request set (handed to ``translate`` for
the engine's terms), the RPC handlers, and the deltas back to protobuf. No I/O below the RPCs,
no tensors anywhere.

Each RPC checks the serving phase (UNAVAILABLE while loading or draining), resolves the
request, and maps every failure through ``status.status_for``. The stream's ``finally`` aborts
the engine request, so a client cancel or an expired deadline frees its KV blocks within one
engine step.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, NoReturn

import grpc

from pagedserve.backend.engine.request import (
    FinishReason,
    RequestOutputDelta,
    TokenLogprob,
    Usage,
)
from pagedserve.backend.sampling_params import SamplingParams
from pagedserve.backend.server.choices import (
    ChoiceDelta,
    checked_num_choices,
    prompt_token_ids,
    submit_choices,
    tokenized,
)
from pagedserve.backend.server.state import ServerState
from pagedserve.backend.server.status import (
    InvalidArgumentError,
    ModelNotFoundError,
    RpcStatusError,
    UnavailableError,
    status_for,
)
from pagedserve.backend.server.translate import (
    Coercion,
    PromptInput,
    build_sampling_params,
    resolve_prompt,
)
from pagedserve.backend.server.wire import UndecodableRequest, tolerant_deserializer
from pagedserve.backend.telemetry.tracing import NoTrace, RpcTrace
from pagedserve.v1 import generation_pb2 as pb

if TYPE_CHECKING:
    from pagedserve.backend.engine.client import EngineClient

logger = logging.getLogger(__name__)


# -- protobuf <-> engine -------------------------------------------------------------------
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


def delta_to_proto(request_id: str, delta: RequestOutputDelta, index: int = 0) -> pb.GenerateResponse:
    """One streamed message of choice ``index``: the delta's text and tokens, finish fields on
    the last one."""
    response = pb.GenerateResponse(
        request_id=request_id, text=delta.text, token_ids=delta.token_ids, index=index
    )
    if delta.logprobs:
        response.logprobs.extend(_logprobs_to_proto(delta.logprobs))
    if delta.finished:
        _set_finish(response, delta)
    return response


class CompletionAccumulator:
    """Folds one choice's deltas into its whole response."""

    def __init__(self, request_id: str, index: int = 0) -> None:
        self._request_id = request_id
        self._index = index
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
            request_id=self._request_id,
            text="".join(self._text),
            token_ids=self._token_ids,
            index=self._index,
        )
        response.logprobs.extend(_logprobs_to_proto(self._logprobs))
        if self._last is not None and self._last.finished:
            _set_finish(response, self._last)
        return response


def complete_response(
    request_id: str, accumulators: dict[int, CompletionAccumulator]
) -> pb.GenerateResponse:
    """Complete's one message: the choice itself when there is one, else every choice in
    ``choices`` under a usage that counts the prompt once."""
    if len(accumulators) == 1:
        return accumulators[0].response()
    choices = [accumulators[i].response() for i in sorted(accumulators)]
    response = pb.GenerateResponse(request_id=request_id, choices=choices)
    response.usage.prompt_tokens = choices[0].usage.prompt_tokens
    response.usage.cached_prompt_tokens = choices[0].usage.cached_prompt_tokens
    response.usage.completion_tokens = sum(c.usage.completion_tokens for c in choices)
    return response


# -- the service ---------------------------------------------------------------------------

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name


async def _abort(context: grpc.aio.ServicerContext, error: BaseException) -> NoReturn:
    code, details = status_for(error)
    if code == grpc.StatusCode.INTERNAL:
        logger.error("request failed: %s", details, exc_info=error)
    await context.abort(code, details)
    raise AssertionError("context.abort returned")  # it raises; this keeps type checkers honest


class GenerationServicer:
    """The native generation API over one engine (found in the shared ServerState)."""

    def __init__(self, state: ServerState) -> None:
        self._state = state

    # -- helpers -------------------------------------------------------------------------------

    def _serving_engine(self) -> EngineClient:
        return self._state.serving_engine()

    def _loaded_engine(self) -> EngineClient:
        """For read-only RPCs, which keep answering while the server drains."""
        if self._state.engine is None:
            raise UnavailableError(self._state.unavailable_reason() or "model is loading")
        return self._state.engine

    def _check_model(self, model: str) -> None:
        if model and model != self._state.served_model_name:
            raise ModelNotFoundError(model, self._state.served_model_name)

    async def _deltas(
        self,
        request: pb.GenerateRequest | UndecodableRequest,
        request_id: str,
        trace: RpcTrace | NoTrace,
        streaming: bool,
    ) -> AsyncGenerator[ChoiceDelta, None]:
        """Admit the request's choices and yield their deltas; a failed choice raises its
        typed error (and the others are aborted)."""
        if isinstance(request, UndecodableRequest):
            raise InvalidArgumentError(request.field, request.reason)
        engine = self._serving_engine()
        self._check_model(request.model)
        prompt = prompt_input_from_proto(request)
        params = sampling_params_from_proto(request)
        n = checked_num_choices(request.n if request.HasField("n") else None)
        prompt_ids = await prompt_token_ids(engine, prompt)
        trace.start_request(
            model=request.model,
            served_model=self._state.served_model_name,
            chat=prompt.messages is not None,
            stream=streaming,
            params=params,
        )
        choices = submit_choices(engine, [prompt_ids], params, n, request_id)
        trace.mark_admitted()
        try:
            async for choice in choices.deltas():
                if choice.delta.finish_reason is FinishReason.ERROR:
                    raise RpcStatusError(
                        grpc.StatusCode.INTERNAL,
                        f"request {request_id} failed: {choice.delta.error}",
                    )
                yield choice
        finally:
            # Closing the engine's iterators before they finished (cancel, deadline, a failure
            # here) aborts every choice and frees its blocks within one engine step.
            await choices.aclose()

    # -- RPCs ----------------------------------------------------------------------------------

    async def Generate(
        self,
        request: pb.GenerateRequest | UndecodableRequest,
        context: grpc.aio.ServicerContext,
    ) -> None:
        # Written with context.write rather than yielded, so a cancel lands inside this
        # coroutine (at an await) and the finally below aborts the engine request at once.
        request_id = _request_id(request)
        with self._state.telemetry.rpc(SERVICE_NAME, "Generate", context, request_id) as trace:
            deltas = self._deltas(request, request_id, trace, streaming=True)
            try:
                async for choice in deltas:
                    await context.write(delta_to_proto(request_id, choice.delta, choice.index))
            except Exception as error:
                if isinstance(error, grpc.aio.AbortError):
                    raise
                await _abort(context, error)
            finally:
                await deltas.aclose()

    async def Complete(
        self,
        request: pb.GenerateRequest | UndecodableRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.GenerateResponse:
        request_id = _request_id(request)
        accumulators: dict[int, CompletionAccumulator] = {}
        with self._state.telemetry.rpc(SERVICE_NAME, "Complete", context, request_id) as trace:
            deltas = self._deltas(request, request_id, trace, streaming=False)
            try:
                async for choice in deltas:
                    accumulator = accumulators.get(choice.index)
                    if accumulator is None:
                        accumulator = accumulators[choice.index] = CompletionAccumulator(
                            request_id, choice.index
                        )
                    accumulator.add(choice.delta)
                return complete_response(request_id, accumulators)
            except Exception as error:
                if isinstance(error, grpc.aio.AbortError):
                    raise
                await _abort(context, error)
            finally:
                await deltas.aclose()

    async def Tokenize(
        self,
        request: pb.TokenizeRequest | UndecodableRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.TokenizeResponse:
        try:
            if isinstance(request, UndecodableRequest):
                raise InvalidArgumentError(request.field, request.reason)
            engine = self._loaded_engine()
            self._check_model(request.model)
            add_special = (
                request.add_special_tokens if request.HasField("add_special_tokens") else True
            )
            token_ids = await tokenized(engine, "text", request.text, add_special)
            return pb.TokenizeResponse(token_ids=token_ids)
        except Exception as error:
            await _abort(context, error)

    async def GetModelInfo(
        self,
        request: pb.GetModelInfoRequest | UndecodableRequest,
        context: grpc.aio.ServicerContext,
    ) -> pb.GetModelInfoResponse:
        try:
            if isinstance(request, UndecodableRequest):
                raise InvalidArgumentError(request.field, request.reason)
            engine = self._loaded_engine()
        except Exception as error:
            await _abort(context, error)
        info = engine.model_info
        special = getattr(engine.tokenizer, "all_special_ids", None) or []
        return pb.GetModelInfoResponse(
            model_name=self._state.served_model_name,
            context_length=info.max_model_len,
            vocab_size=info.vocab_size,
            block_size=info.block_size,
            dtype=str(info.dtype),
            device=str(info.device),
            eos_token_ids=list(info.eos_token_ids),
            special_token_ids=sorted(set(special)),
        )

    async def GetLoad(
        self, request: pb.GetLoadRequest | UndecodableRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetLoadResponse:
        try:
            if isinstance(request, UndecodableRequest):
                raise InvalidArgumentError(request.field, request.reason)
            load = self._loaded_engine().get_load()
        except Exception as error:
            await _abort(context, error)
        return pb.GetLoadResponse(
            num_waiting=load.num_waiting,
            num_running=load.num_running,
            kv_cache_usage=load.kv_cache_usage,
            num_free_blocks=load.num_free_blocks,
            num_total_blocks=load.num_total_blocks,
            prefix_cache_hit_rate=load.prefix_cache_hit_rate,
            prefix_cache_queries=load.prefix_cache_queries,
            prefix_cache_hits=load.prefix_cache_hits,
        )


def _request_id(request: pb.GenerateRequest | UndecodableRequest) -> str:
    """The client's id, or a fresh one the server echoes back."""
    if isinstance(request, pb.GenerateRequest) and request.request_id:
        return request.request_id
    return uuid.uuid4().hex


def add_generation_service(server: grpc.aio.Server, state: ServerState) -> list[str]:
    """Register the service on ``server``; returns its name (for reflection and health).

    Built by hand rather than with the generated ``add_..._to_server`` so every request uses
    the tolerant deserializer (invalid UTF-8 or unparsable bytes -> INVALID_ARGUMENT, not a
    crash).
    """
    servicer = GenerationServicer(state)
    generate_request = tolerant_deserializer(pb.GenerateRequest)
    handlers: dict[str, grpc.RpcMethodHandler] = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate,
            request_deserializer=generate_request,
            response_serializer=pb.GenerateResponse.SerializeToString,
        ),
        "Complete": grpc.unary_unary_rpc_method_handler(
            servicer.Complete,
            request_deserializer=generate_request,
            response_serializer=pb.GenerateResponse.SerializeToString,
        ),
        "Tokenize": grpc.unary_unary_rpc_method_handler(
            servicer.Tokenize,
            request_deserializer=tolerant_deserializer(pb.TokenizeRequest),
            response_serializer=pb.TokenizeResponse.SerializeToString,
        ),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo,
            request_deserializer=tolerant_deserializer(pb.GetModelInfoRequest),
            response_serializer=pb.GetModelInfoResponse.SerializeToString,
        ),
        "GetLoad": grpc.unary_unary_rpc_method_handler(
            servicer.GetLoad,
            request_deserializer=tolerant_deserializer(pb.GetLoadRequest),
            response_serializer=pb.GetLoadResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    return [SERVICE_NAME]
