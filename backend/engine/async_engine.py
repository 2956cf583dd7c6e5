"""The asyncio front of the engine: requests in, async iterators of deltas out.

The step loop runs off the event loop, so a slow model step never stalls gRPC I/O, health
checks or cancellations: on a thread of this process, or in a process of its own
(``engine_process=True``; see ``engine_process.py`` for why). The loop owns every piece of
engine state; the front builds and validates requests, sends adds and aborts, and receives each
step's deltas, handed to each event loop with one ``call_soon_threadsafe``.

Each request's undelivered deltas wait in a mailbox that merges them: a stream read slower than
steps arrive (a busy event loop, a slow client) gets its next message with every token made
since the last one, rather than a backlog of one message per step. Under load this is what
keeps a server's gRPC work per token falling as the batch grows.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from pagedserve.backend.config import EngineConfig
from pagedserve.backend.engine.engine import LLMEngine, LoadInfo, ModelInfo, StepInfo
from pagedserve.backend.engine.engine_loop import EngineSink, EngineThread
from pagedserve.backend.engine.engine_process import EngineProcess
from pagedserve.backend.engine.request import Request, RequestOutputDelta
from pagedserve.backend.engine.request_builder import RequestBuilder, request_id_in_use
from pagedserve.backend.errors import (
    EngineDeadError,
    PagedServeError,
    QueueFullError,
)
from pagedserve.backend.sampling_params import SamplingParams

# How long shutdown waits for the engine loop to end its requests and stop.
SHUTDOWN_TIMEOUT_S = 30.0

StepListener = Callable[[StepInfo], None]
OutputListener = Callable[[list[RequestOutputDelta]], None]


class _Mailbox:
    """One request's deltas not yet taken by its stream, merged into one. Touched only on the
    stream's event loop (the engine thread hands items over through ``call_soon_threadsafe``).

    After the first take, a take waits until ``min_tokens`` tokens are pending (or the request
    has finished): the stream interval."""

    __slots__ = ("loop", "min_tokens", "delta", "error", "waiter", "_interval")

    def __init__(self, loop: asyncio.AbstractEventLoop, stream_interval: int) -> None:
        self.loop = loop
        self.min_tokens = 1  # the first token goes out at once (time to first token)
        self.delta: RequestOutputDelta | None = None
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self._interval = stream_interval

    def put(self, item: RequestOutputDelta | BaseException) -> None:
        if isinstance(item, BaseException):
            if self.error is None:
                self.error = item
        elif self.delta is None:
            self.delta = item
        else:
            self.delta = self.delta.followed_by(item)
        if self._ready() and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _ready(self) -> bool:
        delta = self.delta
        if delta is None:
            return self.error is not None
        return delta.finished or len(delta.token_ids) >= self.min_tokens or self.error is not None

    async def take(self) -> RequestOutputDelta:
        """Everything delivered since the last take; raises a delivered error once the deltas
        before it have been taken."""
        while not self._ready():
            self.waiter = self.loop.create_future()
            await self.waiter
        if self.delta is None:
            assert self.error is not None
            raise self.error
        delta, self.delta = self.delta, None
        self.min_tokens = self._interval
        return delta


def _checked_interval(stream_interval: int) -> int:
    if stream_interval < 1:
        raise ValueError(f"stream_interval must be at least 1, got {stream_interval}")
    return stream_interval


def _put_all(items: list[tuple[_Mailbox, RequestOutputDelta | BaseException]]) -> None:
    for mailbox, item in items:
        mailbox.put(item)


class EngineHandle(Protocol):
    """Where the step loop runs: ``EngineThread`` or ``EngineProcess``."""

    engine: LLMEngine | None  # the engine object itself, when it lives in this process
    model_info: ModelInfo
    builder: RequestBuilder
    max_queued_requests: int
    initial_load: LoadInfo

    @property
    def pid(self) -> int | None:
        """The engine process's id; None when the loop runs in this process."""

    @property
    def is_alive(self) -> bool: ...

    def start(self, sink: EngineSink) -> None: ...

    def add(self, request: Request) -> None: ...

    def abort(self, request_id: str) -> None: ...

    def shutdown(self, timeout_s: float) -> None: ...


class AsyncEngine:
    """The event loops' side of the engine, and the sink of its step loop."""

    def __init__(self, handle: EngineHandle, stream_interval: int = 1) -> None:
        """``stream_interval``: tokens each delta of a stream carries after its first (the last
        may carry fewer); see ``ServerConfig.stream_interval``."""
        self._stream_interval = _checked_interval(stream_interval)
        self._handle = handle
        self.model_info: ModelInfo = handle.model_info
        self._builder = handle.builder
        self.tokenizer = handle.builder.tokenizer
        self._streams: dict[str, _Mailbox] = {}
        self._lock = threading.Lock()  # guards _streams and the counters below
        self._pending_adds = 0
        self._load: LoadInfo = handle.initial_load
        self._error: EngineDeadError | None = None
        self._step_listeners: list[StepListener] = []
        self._output_listeners: list[OutputListener] = []
        handle.start(self)

    @classmethod
    def from_config(
        cls, config: EngineConfig, stream_interval: int = 1, *, engine_process: bool = False
    ) -> "AsyncEngine":
        """Blocking: loads the model and starts the step loop, in a process of its own when
        ``engine_process``, else on a thread of this one."""
        _checked_interval(stream_interval)  # before the (slow) model load
        if engine_process:
            return cls(EngineProcess(config), stream_interval)
        return cls(EngineThread(LLMEngine(config)), stream_interval)

    # -- public API (event-loop side) --------------------------------------------------------
    @property
    def engine(self) -> LLMEngine | None:
        """The engine itself when its loop runs on a thread of this process (in-process tools
        and tests inspect it), else None."""
        return self._handle.engine

    @property
    def engine_pid(self) -> int | None:
        """The engine process's id, or None when the loop runs in this process."""
        return self._handle.pid

    @property
    def is_alive(self) -> bool:
        return self._handle.is_alive and self._error is None

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._builder.tokenize(text, add_special_tokens)

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self._builder.render_chat(messages)

    def add_step_listener(self, listener: StepListener) -> None:
        """``listener(StepInfo)`` is called after every step, before its deltas are delivered,
        on the thread that receives them from the loop."""
        self._step_listeners.append(listener)

    def add_output_listener(self, listener: OutputListener) -> None:
        """``listener(deltas)`` is called with every batch of deltas the loop delivers,
        including the final deltas of requests whose stream was closed (aborts)."""
        self._output_listeners.append(listener)

    def get_load(self) -> LoadInfo:
        return self._load

    def generate(
        self,
        *,
        prompt: str | None = None,
        prompt_token_ids: list[int] | None = None,
        params: SamplingParams,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutputDelta]:
        """Validate and enqueue now (raising typed errors); stream deltas from the iterator.

        Closing or cancelling the iterator aborts the request and frees its blocks.
        """
        if not self.is_alive:
            raise EngineDeadError(str(self._error or "the engine has stopped"))
        with self._lock:
            if request_id and request_id in self._streams:
                raise request_id_in_use(request_id)
            limit = self._handle.max_queued_requests
            if self._load.num_waiting + self._pending_adds >= limit:
                raise QueueFullError(f"the waiting queue is full ({limit} requests)")
            request = self._builder.build(
                prompt=prompt, prompt_token_ids=prompt_token_ids, params=params,
                request_id=request_id,
            )
            mailbox = _Mailbox(asyncio.get_running_loop(), self._stream_interval)
            self._streams[request.request_id] = mailbox
            self._pending_adds += 1
        self._handle.add(request)
        return self._stream(request, mailbox)

    async def _stream(
        self, request: Request, mailbox: _Mailbox
    ) -> AsyncIterator[RequestOutputDelta]:
        finished = False
        try:
            while True:
                try:
                    delta = await mailbox.take()
                except BaseException:
                    finished = mailbox.error is not None
                    raise
                finished = delta.finished
                yield delta
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(request.request_id, None)
            if not finished:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        self._handle.abort(request_id)

    def shutdown(self) -> None:
        """Stop the loop (running requests end as aborted, streams fail) and wait for it."""
        self._handle.shutdown(SHUTDOWN_TIMEOUT_S)

    # -- the loop's sink (called from the thread that runs or reads the loop) -----------------
    def deliver(
        self,
        deltas: list[RequestOutputDelta],
        step: StepInfo | None,
        load: LoadInfo,
        adds_taken: int,
    ) -> None:
        with self._lock:
            self._pending_adds -= adds_taken
            self._load = load
        # Listeners before delivery: a client that saw a token can count on telemetry having
        # the step that made it.
        if step is not None:
            for step_listener in self._step_listeners:
                step_listener(step)
        if not deltas:
            return
        for listener in self._output_listeners:
            listener(deltas)
        with self._lock:
            streams = self._streams
            items = [(streams[d.request_id], d) for d in deltas if d.request_id in streams]
        self._post(items)

    def reject(self, request_id: str, error: PagedServeError) -> None:
        with self._lock:
            mailbox = self._streams.get(request_id)
        if mailbox is not None:
            self._post([(mailbox, error)])

    def fail(self, error: EngineDeadError) -> None:
        if self._error is None:
            self._error = error
        with self._lock:
            items: list[tuple[_Mailbox, RequestOutputDelta | BaseException]] = [
                (mailbox, error) for mailbox in self._streams.values()
            ]
        self._post(items)

    @staticmethod
    def _post(items: list[tuple[_Mailbox, RequestOutputDelta | BaseException]]) -> None:
        """One wake-up per event loop for a whole step's deltas."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Mailbox, Any]]] = {}
        for mailbox, item in items:
            by_loop.setdefault(mailbox.loop, []).append((mailbox, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass
