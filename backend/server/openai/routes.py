"""The handlers: completions and chat (streamed or not), models and health.

A generation request goes: serving phase (503 while loading or draining), body, model (404),
fields (400, ``protocol``), prompt tokens, admission of every choice (``submit_choices``: 400
for a bound, 429 for a full queue), then the response. Everything up to admission fails with an
HTTP status; once a stream has started, a failure arrives in-band as an error event before
``[DONE]``. However the handler ends (finished, failed, the client gone: aiohttp cancels the
handler of a closed connection), ``Choices.aclose`` aborts what is still running in the engine.

The request span is opened as gRPC's is (``ServerTelemetry.http``): parented on the
``traceparent`` header, following the engine request of choice 0.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from aiohttp import web

from pagedserve.backend.errors import InvalidRequestError
from pagedserve.backend.sampling_params import SamplingParams
from pagedserve.backend.server.choices import Choices, rendered_chat, submit_choices, tokenized
from pagedserve.backend.server.openai import sse
from pagedserve.backend.server.openai.errors import ApiError, api_error, renamed
from pagedserve.backend.server.openai.protocol import Generation, parse_chat, parse_completion
from pagedserve.backend.server.openai.responses import (
    ChatRenderer,
    CompletionRenderer,
    Renderer,
    TokenTexts,
    joined,
)
from pagedserve.backend.server.state import ServerState
from pagedserve.backend.server.status import ModelNotFoundError
from pagedserve.backend.telemetry.tracing import NoTrace, RpcTrace

if TYPE_CHECKING:
    from pagedserve.backend.engine.client import EngineClient
    from pagedserve.backend.engine.request import RequestOutputDelta

logger = logging.getLogger(__name__)

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"
MODELS = "/v1/models"
HEALTH = "/health"
OWNER = "pagedserve"
# The application's body limit (``client_max_size``), for the 413's message.
BODY_LIMIT = web.AppKey("body_limit", int)

Trace = RpcTrace | NoTrace


@dataclass
class _Job:
    """A parsed request in the engine's terms, ready to admit."""

    generation: Generation
    engine: EngineClient
    prompts: list[list[int]]
    params: SamplingParams
    renderer: Renderer
    chat: bool


class OpenAIRoutes:
    """The API over the server's one engine (found in the shared ServerState)."""

    def __init__(self, state: ServerState) -> None:
        self._state = state
        self._created = int(time.time())
        self._texts: TokenTexts | None = None

    def add_to(self, app: web.Application) -> None:
        app.router.add_post(COMPLETIONS, self.completions)
        app.router.add_post(CHAT_COMPLETIONS, self.chat_completions)
        app.router.add_get(MODELS, self.models)
        app.router.add_get(MODELS + "/{model}", self.model)
        app.router.add_get(HEALTH, self.health)

    # -- helpers -------------------------------------------------------------------------------

    def _serving_engine(self) -> EngineClient:
        return self._state.serving_engine()

    def _check_model(self, model: str) -> None:
        if model != self._state.served_model_name:
            raise ModelNotFoundError(model, self._state.served_model_name)

    def _token_texts(self, engine: EngineClient) -> TokenTexts:
        if self._texts is None:
            self._texts = TokenTexts(engine.tokenizer)
        return self._texts

    @staticmethod
    def _refused(trace: Trace, error: BaseException) -> web.Response:
        failure = api_error(error)
        if failure.status == HTTPStatus.INTERNAL_SERVER_ERROR:
            logger.error("request failed: %s", failure.message, exc_info=error)
        trace.respond(failure.status, failure.message)
        return failure.response()

    # -- generation ----------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, COMPLETIONS, "cmpl", self._completion_job)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, CHAT_COMPLETIONS, "chatcmpl", self._chat_job)

    async def _completion_job(self, data: Any, engine: EngineClient, response_id: str) -> _Job:
        parsed = parse_completion(data)
        generation = parsed.generation
        self._check_model(generation.model)
        prompts = [
            await tokenized(engine, "prompt", p) if isinstance(p, str) else p
            for p in parsed.prompts
        ]
        echoed = None
        if parsed.echo:
            texts = [
                p if isinstance(p, str) else engine.tokenizer.decode(p) for p in parsed.prompts
            ]
            echoed = [text for text in texts for _ in range(generation.n)]
        renderer = CompletionRenderer(
            response_id, generation.model, int(time.time()), self._token_texts(engine),
            logprobs=parsed.logprobs, echoed=echoed,
        )
        return _Job(generation, engine, prompts, generation.params, renderer, chat=False)

    async def _chat_job(self, data: Any, engine: EngineClient, response_id: str) -> _Job:
        parsed = parse_chat(data)
        generation = parsed.generation
        self._check_model(generation.model)
        try:
            prompt = await rendered_chat(
                engine,
                parsed.messages,
                add_generation_prompt=parsed.add_generation_prompt,
                continue_final_message=parsed.continue_final_message,
            )
        except InvalidRequestError as error:
            raise renamed(error, generation.renames) from None
        params = generation.params
        if not generation.max_tokens_given:  # OpenAI's chat default: as long as it fits
            params = replace(params, max_tokens=engine.room_for_output(len(prompt)))
        renderer = ChatRenderer(
            response_id, generation.model, int(time.time()), self._token_texts(engine),
            logprobs=parsed.logprobs, num_choices=generation.n,
        )
        return _Job(generation, engine, [prompt], params, renderer, chat=True)

    async def _generate(
        self,
        request: web.Request,
        route: str,
        prefix: str,
        make_job: Callable[[Any, EngineClient, str], Awaitable[_Job]],
    ) -> web.StreamResponse:
        response_id = f"{prefix}-{uuid.uuid4().hex}"
        telemetry = self._state.telemetry
        with telemetry.http("POST", route, request.headers, response_id, request.scheme) as trace:
            try:
                engine = self._serving_engine()
                job = await make_job(await _json_body(request), engine, response_id)
                generation = job.generation
                trace.start_request(
                    model=generation.model,
                    served_model=self._state.served_model_name,
                    chat=job.chat,
                    stream=generation.stream,
                    params=job.params,
                )
                try:
                    choices = submit_choices(
                        engine, job.prompts, job.params, generation.n, response_id
                    )
                except InvalidRequestError as error:
                    raise renamed(error, generation.renames) from None
                trace.mark_admitted()
            except Exception as error:
                return self._refused(trace, error)
            try:
                if generation.stream:
                    return await self._stream(request, trace, job, choices)
                return await self._whole(job, choices)
            except ConnectionError:
                raise  # the client is gone: nothing to answer
            except Exception as error:
                return self._refused(trace, error)
            finally:
                await choices.aclose()

    async def _whole(self, job: _Job, choices: Choices) -> web.Response:
        deltas: list[list[RequestOutputDelta]] = [[] for _ in range(len(choices))]
        async for item in choices.deltas():
            deltas[item.index].append(item.delta)
        finals = [joined(d) for d in deltas]
        renderer = job.renderer
        body = renderer.response(
            [renderer.choice(i, delta, whole=True) for i, delta in enumerate(finals)],
            _prompt_tokens(job),
            sum(_completion_tokens(d) for d in finals),
        )
        return web.json_response(body, dumps=_dumps)

    async def _stream(
        self, request: web.Request, trace: Trace, job: _Job, choices: Choices
    ) -> web.StreamResponse:
        response = await sse.open_stream(request)
        renderer = job.renderer
        with_usage = job.generation.include_usage
        completion_tokens = 0
        try:
            for choice in renderer.opening():
                await sse.send(response, renderer.chunk([choice], with_usage))
            async for item in choices.deltas():
                delta = item.delta
                if not (delta.text or delta.token_ids or delta.finished):
                    continue
                completion_tokens += _completion_tokens(delta) if delta.finished else 0
                await response.write(renderer.stream_chunk(item.index, delta, with_usage))
            if with_usage:
                await sse.send(
                    response, renderer.usage_chunk(_prompt_tokens(job), completion_tokens)
                )
        except ConnectionError:
            raise
        except Exception as error:  # the status line has gone: the error goes in-band
            failure = api_error(error)
            if failure.status == HTTPStatus.INTERNAL_SERVER_ERROR:
                logger.error("stream failed: %s", failure.message, exc_info=error)
            trace.respond(failure.status, failure.message)
            await sse.send(response, failure.body())
        await sse.finish(response)
        return response

    # -- models and health ---------------------------------------------------------------------

    def _model_card(self) -> dict[str, Any]:
        engine = self._state.engine
        name = self._state.served_model_name
        return {
            "id": name,
            "object": "model",
            "created": self._created,
            "owned_by": OWNER,
            "root": name,
            "max_model_len": engine.model_info.max_model_len if engine is not None else None,
        }

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        try:
            self._check_model(request.match_info["model"])
        except ModelNotFoundError as error:
            return api_error(error).response()
        return web.json_response(self._model_card())

    async def health(self, request: web.Request) -> web.Response:
        """200 while serving; 503 with the reason while loading, draining or failed."""
        reason = self._state.unavailable_reason()
        if reason is not None:
            return ApiError(HTTPStatus.SERVICE_UNAVAILABLE, reason).response()
        return web.json_response({"status": "ok"})


def _prompt_tokens(job: _Job) -> int:
    """Each prompt counted once, whatever its number of choices (as OpenAI counts usage)."""
    return sum(len(p) for p in job.prompts)


def _completion_tokens(final: RequestOutputDelta) -> int:
    return final.usage.completion_tokens if final.usage is not None else len(final.token_ids)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


async def _json_body(request: web.Request) -> Any:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(
            HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
            f"body: larger than this server's limit of {request.app[BODY_LIMIT]} bytes "
            "(--max-message-bytes)",
            "body",
        ) from None
    try:
        return json.loads(raw)
    except ValueError as error:  # UnicodeDecodeError included
        raise InvalidRequestError("body", f"is not valid JSON ({error})") from None
