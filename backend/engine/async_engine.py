"""The asyncio front of the engine: requests in, async iterators of deltas out.

The step loop runs in a dedicated thread, so a slow model step never stalls the event loop
(gRPC I/O, health checks, cancellations). The loop thread owns every piece of engine state;
the event loop talks to it only through a thread-safe inbox (adds, aborts) and receives each
step's deltas with one ``call_soon_threadsafe``.

Each request's undelivered deltas wait in a mailbox that merges them: a stream read slower than
steps arrive (a busy event loop, a slow client) gets its next message with every token made
since the last one, rather than a backlog of one message per step. Under load this is what
keeps a server's gRPC work per token falling as the batch grows.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from pagedserve.backend.config import EngineConfig
from pagedserve.backend.engine.engine import LLMEngine, LoadInfo, ModelInfo, StepInfo
from pagedserve.backend.engine.request import Request, RequestOutputDelta
from pagedserve.backend.errors import (
    EngineDeadError,
    InvalidRequestError,
    PagedServeError,
    QueueFullError,
)
from pagedserve.backend.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

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


class AsyncEngine:
    def __init__(self, engine: LLMEngine, stream_interval: int = 1) -> None:
        """``stream_interval``: tokens each delta of a stream carries after its first (the last
        may carry fewer); see ``ServerConfig.stream_interval``."""
        self._stream_interval = _checked_interval(stream_interval)
        self.engine = engine
        self.model_info: ModelInfo = engine.model_info
        self.tokenizer = engine.tokenizer
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False
        self._streams: dict[str, _Mailbox] = {}
        self._lock = threading.Lock()  # guards _streams and the counters below
        self._pending_adds = 0
        self._load: LoadInfo = engine.get_load()
        self._error: BaseException | None = None
        self._step_listeners: list[StepListener] = []
        self._output_listeners: list[OutputListener] = []
        self._thread = threading.Thread(target=self._run, name="pagedserve-engine", daemon=True)
        self._thread.start()
        engine.add_failure_listener(self._engine_failed)

    @classmethod
    def from_config(cls, config: EngineConfig, stream_interval: int = 1) -> "AsyncEngine":
        """Blocking: loads the model and starts the engine thread."""
        _checked_interval(stream_interval)  # before the (slow) model load
        return cls(LLMEngine(config), stream_interval)

    # -- public API (event-loop side) --------------------------------------------------------
    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._error is None

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.engine.tokenize(text, add_special_tokens)

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.engine.render_chat(messages)

    def add_step_listener(self, listener: StepListener) -> None:
        """``listener(StepInfo)`` is called from the engine thread after every step."""
        self._step_listeners.append(listener)

    def add_output_listener(self, listener: OutputListener) -> None:
        """``listener(deltas)`` is called from the engine thread with every batch of deltas it
        delivers, including the final deltas of requests whose stream was closed (aborts)."""
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
            raise EngineDeadError(f"the engine has stopped: {self._error}")
        with self._lock:
            if request_id and request_id in self._streams:
                raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
            limit = self.engine.config.scheduler.max_queued_requests
            if self._load.num_waiting + self._pending_adds >= limit:
                raise QueueFullError(f"the waiting queue is full ({limit} requests)")
            request = self.engine.make_request(
                prompt=prompt, prompt_token_ids=prompt_token_ids, params=params,
                request_id=request_id,
            )
            mailbox = _Mailbox(asyncio.get_running_loop(), self._stream_interval)
            self._streams[request.request_id] = mailbox
            self._pending_adds += 1
        self._inbox.put(("add", request))
        self._wake.set()
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
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)
        self.engine.shutdown()

    def _engine_failed(self, reason: str) -> None:
        """A tensor-parallel worker died: fail every request now, even while the loop thread
        is still inside a step that can no longer finish."""
        self._error = EngineDeadError(reason)
        self._fail_all(EngineDeadError(f"the engine has stopped: {reason}"))
        self._wake.set()

    # -- engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop:
                if self._drain_inbox():
                    self._load = self.engine.get_load()
                if not self.engine.has_unfinished():
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    continue
                deltas = self.engine.step()
                self._load = self.engine.get_load()
                # Listeners before delivery: a client that saw a token can count on telemetry
                # having the step that made it.
                if self._step_listeners and self.engine.last_step is not None:
                    for listener in self._step_listeners:
                        listener(self.engine.last_step)
                self._deliver(deltas)
        except BaseException as exc:  # the loop itself broke: fail everyone, clearly
            logger.exception("engine loop died")
            self._error = exc
            self._fail_all(EngineDeadError(f"the engine loop died: {exc}"))
            return
        for request_id in list(self.engine.requests):
            delta = self.engine.abort(request_id)
            if delta is not None:
                self._deliver([delta])
        self._fail_all(EngineDeadError("the engine has shut down"))

    def _drain_inbox(self) -> bool:
        """Apply queued adds and aborts; returns whether there were any."""
        drained = False
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return drained
            drained = True
            if kind == "add":
                with self._lock:
                    self._pending_adds -= 1
                try:
                    self.engine.add_request(item)
                except PagedServeError as exc:
                    self._send(item.request_id, exc)
            else:
                delta = self.engine.abort(item)
                if delta is not None:
                    self._deliver([delta])

    def _deliver(self, deltas: list[RequestOutputDelta]) -> None:
        # Listeners first, for the same reason as step listeners.
        for listener in self._output_listeners:
            listener(deltas)
        with self._lock:
            streams = self._streams
            items = [(streams[d.request_id], d) for d in deltas if d.request_id in streams]
        self._post(items)

    def _send(self, request_id: str, item: RequestOutputDelta | BaseException) -> None:
        with self._lock:
            mailbox = self._streams.get(request_id)
        if mailbox is not None:
            self._post([(mailbox, item)])

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            items = [(mailbox, exc) for mailbox in self._streams.values()]
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
