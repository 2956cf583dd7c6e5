"""``pagedserve.v1.GenerationService`` on grpc.aio: protobuf in, engine deltas out.

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

from pagedserve.backend.engine.request import FinishReason, RequestOutputDelta
from pagedserve.backend.server.convert import (
    CompletionAccumulator,
    delta_to_proto,
    prompt_input_from_proto,
    sampling_params_from_proto,
)
from pagedserve.backend.server.state import ServerState
from pagedserve.backend.server.status import (
    InvalidArgumentError,
    ModelNotFoundError,
    RpcStatusError,
    UnavailableError,
    status_for,
)
from pagedserve.backend.server.wire import UndecodableRequest, tolerant_deserializer
from pagedserve.backend.telemetry.tracing import NoTrace, RpcTrace
from pagedserve.v1 import generation_pb2 as pb

if TYPE_CHECKING:
    from pagedserve.backend.engine.client import EngineClient

logger = logging.getLogger(__name__)

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
        reason = self._state.unavailable_reason()
        if reason is not None:
            raise UnavailableError(reason)
        assert self._state.engine is not None
        return self._state.engine

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
    ) -> AsyncGenerator[RequestOutputDelta, None]:
        """Admit the request and yield its deltas; a failed request raises its typed error."""
        if isinstance(request, UndecodableRequest):
            raise InvalidArgumentError(request.field, request.reason)
        engine = self._serving_engine()
        self._check_model(request.model)
        prompt = prompt_input_from_proto(request)
        params = sampling_params_from_proto(request)
        prompt_token_ids = prompt.prompt_token_ids
        if prompt.messages is not None:
            prompt_token_ids = engine.render_chat(prompt.messages)
        trace.start_request(
            model=request.model,
            served_model=self._state.served_model_name,
            chat=prompt.messages is not None,
            stream=streaming,
            params=params,
        )
        stream = engine.generate(
            prompt=prompt.prompt,
            prompt_token_ids=prompt_token_ids,
            params=params,
            request_id=request_id,
        )
        trace.mark_admitted()
        try:
            async for delta in stream:
                if delta.finish_reason is FinishReason.ERROR:
                    raise RpcStatusError(
                        grpc.StatusCode.INTERNAL, f"request {request_id} failed: {delta.error}"
                    )
                yield delta
        finally:
            # Closing the engine's iterator before it finished (cancel, deadline, a failure
            # here) aborts the request and frees its blocks within one engine step.
            await stream.aclose()

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
                async for delta in deltas:
                    await context.write(delta_to_proto(request_id, delta))
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
        accumulator = CompletionAccumulator(request_id)
        with self._state.telemetry.rpc(SERVICE_NAME, "Complete", context, request_id) as trace:
            deltas = self._deltas(request, request_id, trace, streaming=False)
            try:
                async for delta in deltas:
                    accumulator.add(delta)
                return accumulator.response()
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
            return pb.TokenizeResponse(token_ids=engine.tokenize(request.text, add_special))
        except Exception as error:
            await _abort(context, error)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        try:
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
        self, request: pb.GetLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetLoadResponse:
        try:
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

    Built by hand rather than with the generated ``add_..._to_server`` so requests carrying
    strings use the tolerant deserializer (invalid UTF-8 -> INVALID_ARGUMENT, not a crash).
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
            request_deserializer=pb.GetModelInfoRequest.FromString,
            response_serializer=pb.GetModelInfoResponse.SerializeToString,
        ),
        "GetLoad": grpc.unary_unary_rpc_method_handler(
            servicer.GetLoad,
            request_deserializer=pb.GetLoadRequest.FromString,
            response_serializer=pb.GetLoadResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    return [SERVICE_NAME]
