"""``inference.GRPCInferenceService`` (KServe v2, as Triton serves it) on the server's port.

The served model is addressed by its served model name, version ``"1"`` or empty. Generation
follows Triton's vLLM backend (see ``kserve_convert``). ``ModelStreamInfer`` is decoupled: any
number of requests are multiplexed on one stream, each running concurrently in the engine; every
response echoes its request's id and carries ``triton_final_response``; a failed request is
answered in-band (``error_message``) while the stream goes on. When the stream ends or is
cancelled, its unfinished requests are aborted in the engine, which frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any, NoReturn

import grpc

from pagedserve.backend.engine.request import FinishReason, RequestOutputDelta, RequestTimes
from pagedserve.backend.errors import InvalidRequestError, RequestFailedError
from pagedserve.backend.server import kserve_protocol as kp
from pagedserve.backend.server.choices import ChoiceDelta, submit_choices, tokenized
from pagedserve.backend.server.kserve_convert import (
    FINAL_RESPONSE,
    STREAM,
    TEXT_INPUT,
    InferRequest,
    ResponseContent,
    build_response,
    empty_final_response,
    parse_infer_request,
)
from pagedserve.backend.server.kserve_model import (
    MODEL_VERSION,
    ModelStats,
    model_config,
    model_metadata,
    server_metadata,
)
from pagedserve.backend.server.state import ServerState
from pagedserve.backend.server.status import (
    InvalidArgumentError,
    RpcStatusError,
    UnavailableError,
    status_for,
)
from pagedserve.backend.server.wire import UndecodableRequest, tolerant_deserializer
from pagedserve.backend.telemetry.tracing import NoTrace, RpcTrace

if TYPE_CHECKING:
    from pagedserve.backend.engine.client import EngineClient

logger = logging.getLogger(__name__)

SERVICE_NAME = kp.SERVICE_NAME
# The service's descriptors are in the protocol's own pool: the server's reflection reads it.
DESCRIPTOR_POOL = kp.POOL
_NO_REPOSITORY = "pagedserve serves the one model given at start-up; there is no model repository"
_NO_SHARED_MEMORY = "shared-memory tensors are not supported; send tensors in the request"
_NO_SETTINGS = "not adjustable over this protocol; set at start-up"
# Methods of the service that pagedserve does not implement, and why.
UNIMPLEMENTED_METHODS: dict[str, str] = {
    "RepositoryIndex": _NO_REPOSITORY,
    "RepositoryModelLoad": _NO_REPOSITORY,
    "RepositoryModelUnload": _NO_REPOSITORY,
    "SystemSharedMemoryStatus": _NO_SHARED_MEMORY,
    "SystemSharedMemoryRegister": _NO_SHARED_MEMORY,
    "SystemSharedMemoryUnregister": _NO_SHARED_MEMORY,
    "CudaSharedMemoryStatus": _NO_SHARED_MEMORY,
    "CudaSharedMemoryRegister": _NO_SHARED_MEMORY,
    "CudaSharedMemoryUnregister": _NO_SHARED_MEMORY,
    "TraceSetting": _NO_SETTINGS,
    "LogSettings": _NO_SETTINGS,
}


class UnknownModelError(RpcStatusError):
    """Worded as Triton words it, so clients matching on the text keep working."""

    def __init__(self, name: str, version: str = "") -> None:
        which = f"{name!r}" if not version else f"{name!r} version {version}"
        super().__init__(
            grpc.StatusCode.NOT_FOUND, f"Request for unknown model: {which} is not found"
        )


def _renamed_prompt_error(error: InvalidRequestError) -> InvalidRequestError:
    """The engine names its own prompt fields; over KServe the prompt is ``text_input``."""
    if error.field not in ("prompt", "prompt_token_ids"):
        return error
    message = str(error).removeprefix(f"{error.field}: ")
    return type(error)(TEXT_INPUT, message)


def _stream_error(request: Any, error: BaseException) -> Any:
    """An in-band failure for one request of a stream; the stream itself goes on."""
    _, details = status_for(error)
    request_id = request.id if isinstance(request, kp.ModelInferRequest) else ""
    model_name = request.model_name if isinstance(request, kp.ModelInferRequest) else ""
    infer_response = kp.ModelInferResponse(
        model_name=model_name, model_version=MODEL_VERSION, id=request_id
    )
    infer_response.parameters[FINAL_RESPONSE].bool_param = True
    prefix = f"[request id: {request_id}] " if request_id else ""
    return kp.ModelStreamInferResponse(
        error_message=prefix + details, infer_response=infer_response
    )


async def _abort(context: grpc.aio.ServicerContext, error: BaseException) -> NoReturn:
    code, details = status_for(error)
    if code == grpc.StatusCode.INTERNAL:
        logger.error("KServe request failed: %s", details, exc_info=error)
    await context.abort(code, details)
    raise AssertionError("context.abort returned")  # it raises


class _Choice:
    """Accumulates one choice's deltas into its whole completion."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.num_tokens = 0
        self.finish_reason: FinishReason | None = None
        self.times: RequestTimes | None = None

    def add(self, delta: RequestOutputDelta) -> None:
        self.pieces.append(delta.text)
        self.num_tokens += len(delta.token_ids)
        if delta.finished:
            self.finish_reason = delta.finish_reason
            self.times = delta.times


class _Completion:
    """A request's choices as their deltas come."""

    def __init__(self) -> None:
        self.num_input_tokens = 0
        self.choices: list[_Choice] = [_Choice()]

    def start(self, n: int, num_input_tokens: int) -> None:
        self.num_input_tokens = num_input_tokens
        self.choices = [_Choice() for _ in range(n)]

    @property
    def finished(self) -> bool:
        return all(choice.finish_reason is not None for choice in self.choices)

    @property
    def times(self) -> RequestTimes | None:
        """Choice 0's marks (its engine request carries the request's id and span)."""
        return self.choices[0].times

    def streamed(self, index: int, delta: RequestOutputDelta) -> list[ResponseContent]:
        """One streamed response's entries: this choice's delta, nothing new for the others
        (a finished one still says why it finished)."""
        return [
            ResponseContent(
                text=delta.text if i == index else "",
                finish_reason=choice.finish_reason,
                num_input_tokens=self.num_input_tokens,
                num_output_tokens=len(delta.token_ids) if i == index else 0,
            )
            for i, choice in enumerate(self.choices)
        ]

    def whole(self, request: InferRequest) -> list[ResponseContent]:
        """The one response of a non-streaming request: prompt + completion unless excluded."""
        contents = []
        for choice in self.choices:
            text = "".join(choice.pieces)
            contents.append(ResponseContent(
                text=request.prompt + text if request.prepend_prompt else text,
                finish_reason=choice.finish_reason,
                num_input_tokens=self.num_input_tokens,
                num_output_tokens=choice.num_tokens,
            ))
        return contents


class KServeServicer:
    """The KServe v2 methods over the engine found in the shared ServerState."""

    def __init__(self, state: ServerState) -> None:
        self._state = state
        self._stats = ModelStats()

    # -- helpers -------------------------------------------------------------------------------

    @property
    def _model_name(self) -> str:
        return self._state.served_model_name

    def _check_model(self, name: str, version: str) -> None:
        if name != self._model_name:
            raise UnknownModelError(name)
        if version not in ("", MODEL_VERSION):
            raise UnknownModelError(name, version)

    def _serving_engine(self) -> EngineClient:
        return self._state.serving_engine()

    def _loaded_engine(self) -> EngineClient:
        """For read-only methods, which keep answering while the server drains."""
        if self._state.engine is None:
            raise UnavailableError(self._state.unavailable_reason() or "model is loading")
        return self._state.engine

    def _parse(self, request: Any) -> tuple[EngineClient, InferRequest]:
        if isinstance(request, UndecodableRequest):
            raise InvalidArgumentError(request.field, request.reason)
        self._check_model(request.model_name, request.model_version)
        engine = self._serving_engine()
        return engine, parse_infer_request(request, self._model_name)

    async def _deltas(
        self,
        engine: EngineClient,
        request: InferRequest,
        completion: _Completion,
        request_id: str,
        trace: RpcTrace | NoTrace,
    ) -> AsyncGenerator[ChoiceDelta, None]:
        """Run ``request``'s choices in the engine, adding each delta to ``completion`` as it
        comes, then yielding it.

        Leaving the iteration early (client gone, stream cancelled) closes the engine's
        iterators, which aborts every choice and frees its blocks. ``request_id`` is the engine
        id of choice 0 (a KServe ``id`` need not be unique, so it is not the engine's).
        """
        try:
            prompt_token_ids = await tokenized(engine, "prompt", request.prompt)
            completion.start(request.n, len(prompt_token_ids))
            trace.start_request(
                model=self._model_name,
                served_model=self._model_name,
                chat=False,
                stream=request.stream,
                params=request.params,
            )
            choices = submit_choices(
                engine, [prompt_token_ids], request.params, request.n, request_id
            )
        except InvalidRequestError as error:
            raise _renamed_prompt_error(error) from None
        trace.mark_admitted()
        try:
            async for choice in choices.deltas():
                if choice.delta.finish_reason is FinishReason.ERROR:
                    raise RequestFailedError(f"generation failed: {choice.delta.error}")
                completion.choices[choice.index].add(choice.delta)
                yield choice
        finally:
            await choices.aclose()

    async def _decoupled_responses(
        self,
        engine: EngineClient,
        request: InferRequest,
        completion: _Completion,
        request_id: str,
        trace: RpcTrace | NoTrace,
    ) -> AsyncGenerator[Any, None]:
        """The ModelInferResponses of one request on a stream, each with its final flag."""
        names = {"model_name": self._model_name, "model_version": MODEL_VERSION}
        data_final = not request.empty_final_response
        deltas = self._deltas(engine, request, completion, request_id, trace)
        async with contextlib.aclosing(deltas):
            async for choice in deltas:
                if request.stream:
                    contents = completion.streamed(choice.index, choice.delta)
                    final = completion.finished and data_final
                    yield build_response(request, contents, final=final, **names)
        if not request.stream:
            yield build_response(request, completion.whole(request), final=data_final, **names)
        if request.empty_final_response:
            yield empty_final_response(request, **names)

    # -- health and metadata -------------------------------------------------------------------

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return kp.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return kp.ServerReadyResponse(ready=self._state.serving)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, UndecodableRequest):
            await _abort(context, InvalidArgumentError(request.field, request.reason))
        known = request.name == self._model_name and request.version in ("", MODEL_VERSION)
        return kp.ModelReadyResponse(ready=known and self._state.serving)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return server_metadata()

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(request, UndecodableRequest):
                raise InvalidArgumentError(request.field, request.reason)
            self._check_model(request.name, request.version)
        except RpcStatusError as error:
            await _abort(context, error)
        return model_metadata(self._model_name)

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(request, UndecodableRequest):
                raise InvalidArgumentError(request.field, request.reason)
            self._check_model(request.name, request.version)
            engine = self._loaded_engine()
        except RpcStatusError as error:
            await _abort(context, error)
        return model_config(self._model_name, engine.model_info.max_model_len)

    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if isinstance(request, UndecodableRequest):
                raise InvalidArgumentError(request.field, request.reason)
            if request.name:  # empty: every model
                self._check_model(request.name, request.version)
        except RpcStatusError as error:
            await _abort(context, error)
        return kp.ModelStatisticsResponse(model_stats=[self._stats.to_proto(self._model_name)])

    # -- inference -----------------------------------------------------------------------------

    async def _infer(
        self, request: Any, request_id: str, trace: RpcTrace | NoTrace
    ) -> tuple[Any, RequestTimes | None]:
        """One unary request: the whole completion in one response."""
        engine, parsed = self._parse(request)
        if parsed.stream:
            raise InvalidArgumentError(
                STREAM, "true needs the streaming method ModelStreamInfer (decoupled model)"
            )
        completion = _Completion()
        deltas = self._deltas(engine, parsed, completion, request_id, trace)
        async with contextlib.aclosing(deltas):
            async for _ in deltas:
                pass
        response = build_response(
            parsed,
            completion.whole(parsed),
            model_name=self._model_name,
            model_version=MODEL_VERSION,
        )
        return response, completion.times

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = time.monotonic()
        request_id = uuid.uuid4().hex
        with self._state.telemetry.rpc(SERVICE_NAME, "ModelInfer", context, request_id) as trace:
            try:
                response, times = await self._infer(request, request_id, trace)
            except Exception as error:
                if isinstance(error, grpc.aio.AbortError):
                    raise
                self._stats.record_failure(time.monotonic() - started)
                await _abort(context, error)
        self._stats.record_success(time.monotonic() - started, times)
        return response

    async def _serve_stream_request(
        self, request: Any, out: asyncio.Queue[Any], context: grpc.aio.ServicerContext
    ) -> None:
        """Run one request of a stream, putting its responses (or its error) on ``out``.

        Each request of a stream has a SERVER span of its own (named after the method, child
        of the stream's ``traceparent``), as a native Generate call has: the same phases and
        attributes, ended with the status its in-band answer carries."""
        started = time.monotonic()
        completion = _Completion()
        request_id = uuid.uuid4().hex
        telemetry = self._state.telemetry
        with telemetry.rpc(SERVICE_NAME, "ModelStreamInfer", context, request_id) as trace:
            try:
                engine, parsed = self._parse(request)
                responses = self._decoupled_responses(
                    engine, parsed, completion, request_id, trace
                )
                async with contextlib.aclosing(responses):
                    async for response in responses:
                        await out.put(kp.ModelStreamInferResponse(infer_response=response))
            except Exception as error:
                self._stats.record_failure(time.monotonic() - started)
                code, details = status_for(error)
                trace.answer_in_band(code, details)
                if code == grpc.StatusCode.INTERNAL:
                    logger.error("KServe stream request failed", exc_info=error)
                await out.put(_stream_error(request, error))
                return
        self._stats.record_success(time.monotonic() - started, completion.times)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> None:
        # Written with context.write (not yielded) so that a cancel lands at an await in this
        # coroutine and the finally below aborts every request of the stream at once.
        out: asyncio.Queue[Any] = asyncio.Queue()
        done = object()  # every producer (the reader, each request) puts it once, at its end
        tasks: set[asyncio.Task[None]] = set()
        producers = 1  # the reader, plus one per request it starts

        async def serve(request: Any) -> None:
            try:
                await self._serve_stream_request(request, out, context)
            finally:
                out.put_nowait(done)

        async def read() -> None:
            nonlocal producers
            try:
                async for request in request_iterator:
                    producers += 1
                    task = asyncio.create_task(serve(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            except Exception as error:  # the request stream broke: end the call with it
                out.put_nowait(error)
            finally:
                out.put_nowait(done)

        reader = asyncio.create_task(read())
        drain = asyncio.create_task(self._state.drain_started.wait())
        try:
            while producers:
                if drain.done() and producers == 1:
                    # Draining with no request in flight: end the call (OK) rather than let an
                    # idle client hold the drain until its deadline.
                    break
                get = asyncio.ensure_future(out.get())
                # Once the drain has begun only the queue can wake us (no busy loop).
                waiters = {get} if drain.done() else {get, drain}
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    continue
                item = get.result()
                if item is done:
                    producers -= 1
                elif isinstance(item, Exception):
                    await _abort(context, item)
                else:
                    await context.write(item)
        finally:
            for task in (reader, drain, *tasks):
                task.cancel()
            await asyncio.gather(reader, drain, *tasks, return_exceptions=True)


async def _unimplemented(method: str, context: grpc.aio.ServicerContext) -> NoReturn:
    await context.abort(
        grpc.StatusCode.UNIMPLEMENTED,
        f"{SERVICE_NAME}/{method} is not implemented: {UNIMPLEMENTED_METHODS[method]}",
    )
    raise AssertionError("context.abort returned")  # it raises


def _unimplemented_handler(method: str) -> grpc.RpcMethodHandler:
    async def handle(request: bytes, context: grpc.aio.ServicerContext) -> NoReturn:
        await _unimplemented(method, context)

    # Requests stay bytes: there is nothing to read in them.
    return grpc.unary_unary_rpc_method_handler(handle)


def add_kserve_service(server: grpc.aio.Server, state: ServerState) -> list[str]:
    """Register the service on ``server``; returns its name (for health and reflection)."""
    servicer = KServeServicer(state)
    methods = {m.name: m for m in kp.service_descriptor().methods}
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for name, method in methods.items():
        if name in UNIMPLEMENTED_METHODS:
            handlers[name] = _unimplemented_handler(name)
            continue
        request_class = kp.message_class(method.input_type.name)
        response_class = kp.message_class(method.output_type.name)
        make_handler = (
            grpc.stream_stream_rpc_method_handler
            if method.client_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[name] = make_handler(
            getattr(servicer, name),
            request_deserializer=tolerant_deserializer(request_class),
            response_serializer=response_class.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    return [SERVICE_NAME]
