"""An API request's choices as engine requests, and their streams read as one.

``submit_choices`` is the one place that knows how a request's ``n`` choices (times its
prompts, for a batch of completions) reach the engine; the native, KServe and OpenAI APIs all
go through it. Each choice is an engine request of its own, with its own stream, stop state
and seed: choice ``i`` of a prompt is seeded ``seed + i`` when the request has a seed, so the
choices differ under sampling and come back the same on a repeat (and equal ``n`` separate
requests seeded ``seed .. seed + n - 1``). Choices after the first of a prompt name the first
as their prompt source, so the engine prefills the prompt once and the others map its full
blocks (``Scheduler``). The APIs only see ``Choices``, a stream of (choice index, delta) that
aborts every engine request it holds when closed early.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from pagedserve.backend.config import RequestLimits
from pagedserve.backend.engine.request import RequestOutputDelta
from pagedserve.backend.errors import InvalidRequestError, RequestTooLongError
from pagedserve.backend.sampling_params import SamplingParams
from pagedserve.backend.server.translate import PromptInput

if TYPE_CHECKING:
    from pagedserve.backend.engine.client import EngineClient

DeltaStream = AsyncGenerator[RequestOutputDelta, None]


@dataclass(frozen=True, slots=True)
class ChoiceDelta:
    index: int
    delta: RequestOutputDelta


# Choices one API request may ask for in all (prompts x n): each is an engine request.
MAX_CHOICES = 128


def checked_num_choices(n: int | None, num_prompts: int = 1) -> int:
    """``n`` (1 when unset) if the request may have that many choices per prompt."""
    n = 1 if n is None else n
    if not 1 <= n <= MAX_CHOICES:
        raise InvalidRequestError("n", f"must be in [1, {MAX_CHOICES}], got {n}")
    if n * num_prompts > MAX_CHOICES:
        raise InvalidRequestError(
            "n", f"{num_prompts} prompts x n={n} exceed {MAX_CHOICES} choices in one request"
        )
    return n


# Prompts up to this many UTF-8 bytes are tokenized on the event loop (well under a
# millisecond); a larger one goes to a worker thread, as the tokenizer releases the interpreter
# lock while it works: a megabyte takes seconds, which on the loop stalls every other stream.
INLINE_TOKENIZE_BYTES = 16 * 1024


def _utf8_size(text: str, limit: int) -> int:
    """``text``'s UTF-8 size, without encoding it when its length alone settles the check
    (a character is 1 to 4 bytes)."""
    if len(text) > limit or 4 * len(text) <= limit:
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def _checked_size(field: str, texts: Sequence[str], limits: RequestLimits) -> int:
    """The texts' UTF-8 size, refused over ``--max-prompt-bytes`` before any tokenizing."""
    limit = limits.max_prompt_bytes
    size = sum(_utf8_size(text, limit) for text in texts)
    if size > limit:
        raise RequestTooLongError(
            field, f"the text is larger than this server's limit of {limit} bytes "
            "(--max-prompt-bytes)"
        )
    return size


async def _tokenizer_call(size: int, call: Callable[[], list[int]]) -> list[int]:
    if size <= INLINE_TOKENIZE_BYTES:
        return call()
    return await asyncio.to_thread(call)


async def tokenized(
    engine: EngineClient, field: str, text: str, add_special_tokens: bool = True
) -> list[int]:
    """``text``'s ids, as the engine tokenizes a prompt, once its size is within bounds."""
    size = _checked_size(field, [text], engine.limits)
    return await _tokenizer_call(size, lambda: engine.tokenize(text, add_special_tokens))


async def rendered_chat(
    engine: EngineClient,
    messages: list[dict[str, str]],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> list[int]:
    """The messages through the chat template (``EngineClient.render_chat``), once the size of
    their contents is within bounds."""
    size = _checked_size(
        "messages", [str(m.get("content", "")) for m in messages], engine.limits
    )
    return await _tokenizer_call(
        size,
        lambda: engine.render_chat(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        ),
    )


async def prompt_token_ids(engine: EngineClient, prompt: PromptInput) -> list[int]:
    """The prompt's ids, computed once for all its choices: text tokenized and messages
    rendered as the engine would (ids themselves are checked when each choice is admitted).
    Text over ``--max-prompt-bytes`` is refused untokenized; a large one is tokenized off the
    event loop."""
    if prompt.messages is not None:
        return await rendered_chat(engine, prompt.messages)
    if prompt.prompt_token_ids is not None:
        return prompt.prompt_token_ids
    if not prompt.prompt:
        raise InvalidRequestError("prompt", "must not be empty")
    ids = await tokenized(engine, "prompt", prompt.prompt)
    if not ids:  # e.g. only control characters the tokenizer drops
        raise InvalidRequestError("prompt", "tokenizes to no tokens")
    return ids


def choice_request_id(request_id: str, index: int) -> str:
    """Choice 0 is the request's own id (its span follows that engine request)."""
    return request_id if index == 0 else f"{request_id}-{index}"


def submit_choices(
    engine: EngineClient,
    prompts: Sequence[list[int]],
    params: SamplingParams,
    n: int,
    request_id: str,
) -> Choices:
    """Admit every choice now, or none: the first refusal (a full queue, a bad field) aborts
    those already admitted and raises."""
    streams: list[tuple[str, DeltaStream]] = []
    try:
        for p, prompt in enumerate(prompts):
            for i in range(n):
                seeded = params
                if n > 1 and params.seed is not None:
                    seeded = replace(params, seed=params.seed + i)
                engine_id = choice_request_id(request_id, p * n + i)
                stream = engine.generate(
                    prompt_token_ids=prompt,
                    params=seeded,
                    request_id=engine_id,
                    prompt_source_id=None if i == 0 else choice_request_id(request_id, p * n),
                )
                streams.append((engine_id, stream))
    except BaseException:
        for engine_id, _ in streams:
            engine.abort(engine_id)
        raise
    return Choices(engine, streams)


class Choices:
    """The engine requests of one API request's choices."""

    def __init__(self, engine: EngineClient, streams: list[tuple[str, DeltaStream]]) -> None:
        self._engine = engine
        self._streams = streams
        self._merged: AsyncGenerator[ChoiceDelta, None] | None = None

    def __len__(self) -> int:
        return len(self._streams)

    def deltas(self) -> AsyncGenerator[ChoiceDelta, None]:
        """Every choice's deltas as they come; each choice's last one has ``finished``."""
        assert self._merged is None, "read once"
        self._merged = self._merge()
        return self._merged

    async def _merge(self) -> AsyncGenerator[ChoiceDelta, None]:
        if len(self._streams) == 1:
            async for delta in self._streams[0][1]:
                yield ChoiceDelta(0, delta)
            return
        # One pending read per choice (not a reader task pumping each one into a queue): a
        # choice read slower than the engine steps keeps its deltas merged in its mailbox.
        pending: dict[asyncio.Task[RequestOutputDelta], int] = {}

        def read(index: int) -> None:
            stream = self._streams[index][1]
            pending[asyncio.ensure_future(anext(stream))] = index

        for index in range(len(self._streams)):
            read(index)
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=pending.__getitem__):
                    index = pending.pop(task)
                    delta = task.result()
                    yield ChoiceDelta(index, delta)
                    if not delta.finished:
                        read(index)
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
            for task in pending:  # collected, so that none is reported as never retrieved
                if not task.cancelled():
                    task.exception()

    async def aclose(self) -> None:
        """Abort whatever has not finished (a disconnect, an error, a drain): every engine
        request, read or not, frees its blocks within one engine step."""
        if self._merged is not None:
            await self._merged.aclose()
        for engine_id, stream in self._streams:
            await stream.aclose()
            self._engine.abort(engine_id)
