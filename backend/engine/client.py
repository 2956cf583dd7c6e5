"""The engine core's one client: requests in, async iterators of deltas out.

The core's step loop runs off the event loop, so a slow model step never stalls gRPC I/O,
health checks or cancellations: on a thread of this process, or in a process of its own
(``engine_process=True``: then it has its own interpreter lock, which on a GPU is what limits a
server streaming to many clients). Either way the client and the core exchange only the typed
messages of ``messages.py``, in order, over one channel each way: a queue to a thread, or a
socket to the engine process.

Admission happens here, once: the request is built and validated (``RequestBuilder``), its id
checked against the live streams and the waiting queue's limit applied, before anything reaches
the core. The id check and the add (and a closing stream's abort) are sent under one lock, so
the core, reading its channel in order, never sees an id that is still live.

Each request's undelivered deltas wait in a mailbox that merges them: a stream read slower than
steps arrive (a busy event loop, a slow client) gets its next message with every token made
since the last one, rather than a backlog of one message per step. Under load this is what
keeps a server's gRPC work per token falling as the batch grows.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncGenerator, Callable
from multiprocessing.connection import Connection
from typing import Any, Protocol

from pagedserve.backend.config import EngineConfig, RequestLimits
from pagedserve.backend.engine.core import EngineCore, QueueCommands, relax_gc
from pagedserve.backend.engine.messages import (
    AbortRequest,
    AddRequest,
    Command,
    EngineExited,
    EngineFailed,
    EngineLoadFailed,
    EngineReady,
    Event,
    LoadInfo,
    ModelInfo,
    Shutdown,
    StartEngine,
    StepInfo,
    StepOutputs,
    decode,
    encode,
)
from pagedserve.backend.engine.request import RequestBuilder, RequestOutputDelta, request_id_in_use
from pagedserve.backend.errors import EngineDeadError, PagedServeError, QueueFullError
from pagedserve.backend.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# How long shutdown waits for the engine loop to end its requests and stop.
SHUTDOWN_TIMEOUT_S = 30.0
_ENGINE_MODULE = "pagedserve.backend.engine.core"

StepListener = Callable[[StepInfo], None]
OutputListener = Callable[[list[RequestOutputDelta]], None]
EventHandler = Callable[[Event], None]


class EngineProcessError(PagedServeError):
    """The engine process failed to start."""


class _Mailbox:
    """One request's deltas not yet taken by its stream, merged into one. Touched only on the
    stream's event loop (the channel's thread hands items over through
    ``call_soon_threadsafe``).

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


Item = RequestOutputDelta | BaseException


def _put_all(mailboxes: list[_Mailbox], items: list[Item]) -> None:
    """On a stream's event loop: each item into its mailbox (the lists are aligned)."""
    for mailbox, item in zip(mailboxes, items):
        mailbox.put(item)


# -- channels to the core --------------------------------------------------------------------
class EngineChannel(Protocol):
    """Commands to the core, its events to ``start``'s handler, in order both ways."""

    ready: EngineReady

    @property
    def core(self) -> EngineCore | None:
        """The core itself, when it runs in this process."""

    @property
    def pid(self) -> int | None:
        """The engine process's id; None when the core runs in this process."""

    @property
    def is_alive(self) -> bool: ...

    def start(self, on_event: EventHandler) -> None: ...

    def send(self, command: Command) -> None: ...

    def close(self, timeout_s: float) -> None:
        """Send Shutdown and wait (bounded) for the core to stop."""


class ThreadChannel:
    """The core on a thread of this process: no copies, but one interpreter lock for both. Its
    events are handled on the core's thread."""

    def __init__(self, core: EngineCore) -> None:
        self._core = core
        self.ready = EngineReady(core.model_info, core.builder, core.get_load())
        self._commands = QueueCommands()
        self._thread: threading.Thread | None = None

    @property
    def core(self) -> EngineCore:
        return self._core

    @property
    def pid(self) -> None:
        return None

    def start(self, on_event: EventHandler) -> None:
        self._thread = threading.Thread(
            target=self._core.serve, args=(self._commands, on_event), name="pagedserve-engine",
            daemon=True,
        )
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def send(self, command: Command) -> None:
        self._commands.put(command)

    def close(self, timeout_s: float) -> None:
        self._commands.put(Shutdown())
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
        self._core.shutdown()


class ProcessChannel:
    """The core in a child process behind a socket pair. The child watches the socket (if this
    process goes away, the engine stops and exits); a reader thread here watches it too (an
    engine process that dies fails every request at once)."""

    def __init__(self, config: EngineConfig) -> None:
        """Blocking: starts the process and waits until its model is loaded."""
        # This process now makes thousands of short-lived objects per step (deltas, protobuf
        # messages) beside a large heap: at the default thresholds the collector's full passes
        # measured as a fifth of the server's time under 256 streams.
        relax_gc()
        ours, theirs = socket.socketpair()
        with ours, theirs:
            self._process = subprocess.Popen(
                [sys.executable, "-m", _ENGINE_MODULE, "--fd", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
            )
            self._conn = Connection(ours.detach())
        self._send_lock = threading.Lock()
        self._closing = False
        self._reader: threading.Thread | None = None
        self.send(StartEngine(config))
        self.ready = self._wait_ready()

    def _wait_ready(self) -> EngineReady:
        try:
            event = decode(self._conn.recv_bytes())
        except (EOFError, OSError):
            raise EngineProcessError(
                f"the engine process exited while loading (exit code {self._exit_code()})"
            ) from None
        if isinstance(event, EngineLoadFailed):
            self._exit_code()
            self._conn.close()
            raise event.error
        assert isinstance(event, EngineReady)
        return event

    def _exit_code(self, timeout_s: float = 30.0) -> int | None:
        """Wait (bounded) for the process to end: its exit code, negative for a signal."""
        try:
            return self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    @property
    def core(self) -> None:
        return None  # the core lives in the other process

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def is_alive(self) -> bool:
        return self._process.poll() is None

    def start(self, on_event: EventHandler) -> None:
        self._reader = threading.Thread(
            target=self._read, args=(on_event,), name="pagedserve-engine-reader", daemon=True
        )
        self._reader.start()

    def send(self, command: Command) -> None:
        try:
            frame = encode(command)
            with self._send_lock:
                self._conn.send_bytes(frame)
        except (OSError, ValueError):  # the process is gone (the reader reports it) or closed
            pass

    def close(self, timeout_s: float) -> None:
        """Stop the loop (its requests end as aborted), then wait for the process to exit."""
        self._closing = True
        self.send(Shutdown())
        if self._reader is not None:
            self._reader.join(timeout=timeout_s)
        if self._exit_code(timeout_s) is None:
            logger.warning("the engine process did not exit in %.0f s: killing it", timeout_s)
            self._process.kill()
            self._exit_code()
        self._conn.close()

    def _read(self, on_event: EventHandler) -> None:
        """Hand every event from the engine to the client, in order, until the process ends."""
        try:
            while True:
                event = decode(self._conn.recv_bytes())
                if isinstance(event, EngineExited):
                    return
                on_event(event)  # type: ignore[arg-type]  # the core sends events only
        except (EOFError, OSError):
            if self._closing:
                return
        on_event(
            EngineFailed(
                f"the engine process exited unexpectedly (exit code {self._exit_code(5.0)})"
            )
        )


# -- the client ------------------------------------------------------------------------------
class EngineClient:
    """The event loops' side of the engine core."""

    def __init__(
        self, channel: EngineChannel, max_queued_requests: int, stream_interval: int = 1
    ) -> None:
        """``stream_interval``: tokens each delta of a stream carries after its first (the last
        may carry fewer); see ``ServerConfig.stream_interval``."""
        self._stream_interval = _checked_interval(stream_interval)
        self._channel = channel
        ready = channel.ready
        self.model_info: ModelInfo = ready.model_info
        self._builder: RequestBuilder = ready.builder
        self.tokenizer: Any = ready.builder.tokenizer
        self._max_queued = max_queued_requests
        # The client's request table: each live request's stream, or None for one whose stream
        # was closed early and whose final (abort) delta the core has not sent yet: its id is
        # in use until then, so no later request's stream receives its last deltas. Guarded by
        # _lock, which also orders adds and aborts on the channel.
        self._streams: dict[str, _Mailbox | None] = {}
        self._lock = threading.Lock()
        self._adds_sent = 0
        self._load: LoadInfo = ready.load
        self._error: EngineDeadError | None = None
        self._step_listeners: list[StepListener] = []
        self._output_listeners: list[OutputListener] = []
        channel.start(self._on_event)

    @classmethod
    def from_config(
        cls, config: EngineConfig, stream_interval: int = 1, *, engine_process: bool = False
    ) -> EngineClient:
        """Blocking: loads the model and starts the step loop, in a process of its own when
        ``engine_process``, else on a thread of this one."""
        _checked_interval(stream_interval)  # before the (slow) model load
        channel: EngineChannel = (
            ProcessChannel(config) if engine_process else ThreadChannel(EngineCore(config))
        )
        return cls(channel, config.scheduler.max_queued_requests, stream_interval)

    # -- public API (event-loop side) --------------------------------------------------------
    @property
    def engine(self) -> EngineCore | None:
        """The core itself when its loop runs on a thread of this process (in-process tools
        and tests inspect it), else None."""
        return self._channel.core

    @property
    def engine_pid(self) -> int | None:
        """The engine process's id, or None when the loop runs in this process."""
        return self._channel.pid

    @property
    def is_alive(self) -> bool:
        return self._channel.is_alive and self._error is None

    @property
    def failure(self) -> str | None:
        """Why the engine can run nothing more, once it cannot."""
        if self._error is not None:
            return str(self._error)
        return None if self._channel.is_alive else "the engine loop has ended"

    @property
    def limits(self) -> RequestLimits:
        """The per-request bounds admission applies; the fronts check a prompt's size against
        them before they tokenize it."""
        return self._builder.limits

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._builder.tokenize(text, add_special_tokens)

    def render_chat(
        self,
        messages: list[dict[str, str]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> list[int]:
        return self._builder.render_chat(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
        )

    def room_for_output(self, num_prompt_tokens: int) -> int:
        """The largest ``max_tokens`` a prompt of this length may ask for (``RequestBuilder``)."""
        return self._builder.room_for_output(num_prompt_tokens)

    def add_step_listener(self, listener: StepListener) -> None:
        """``listener(StepInfo)`` is called after every step, before its deltas are delivered,
        on the thread that receives them from the core."""
        self._step_listeners.append(listener)

    def add_output_listener(self, listener: OutputListener) -> None:
        """``listener(deltas)`` is called with every batch of deltas the core delivers,
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
        prompt_source_id: str | None = None,
    ) -> AsyncGenerator[RequestOutputDelta, None]:
        """Admit now (raising typed errors) and send; stream deltas from the iterator.

        ``prompt_source_id`` names a request sent before with the same prompt whose prompt
        blocks this one may share (another choice of one API request). Closing or cancelling
        the iterator aborts the request and frees its blocks.
        """
        request = self._builder.build(
            prompt=prompt, prompt_token_ids=prompt_token_ids, params=params, request_id=request_id
        )
        request.prompt_source_id = prompt_source_id
        mailbox = _Mailbox(asyncio.get_running_loop(), self._stream_interval)
        with self._lock:
            if not self.is_alive:
                raise EngineDeadError(str(self._error or "the engine has stopped"))
            if request.request_id in self._streams:
                raise request_id_in_use(request.request_id)
            load = self._load
            waiting = load.num_waiting + self._adds_sent - load.num_adds_received
            if waiting >= self._max_queued:
                raise QueueFullError(f"the waiting queue is full ({self._max_queued} requests)")
            self._streams[request.request_id] = mailbox
            self._adds_sent += 1
            self._channel.send(AddRequest(request))
        return self._stream(request.request_id, mailbox)

    async def _stream(
        self, request_id: str, mailbox: _Mailbox
    ) -> AsyncGenerator[RequestOutputDelta, None]:
        try:
            while True:
                delta = await mailbox.take()
                yield delta
                if delta.finished:
                    return
        finally:
            with self._lock:
                # Still ours: the core has not sent its final delta (which frees the entry).
                if self._streams.get(request_id) is mailbox:
                    if self._error is None:
                        self._streams[request_id] = None
                        self._channel.send(AbortRequest(request_id))
                    else:
                        del self._streams[request_id]

    def abort(self, request_id: str) -> None:
        """Abort a request whose stream will not be read again, whether it was ever iterated or
        not (closing an async generator that never started does not run its cleanup, so a
        caller holding several streams calls this for each). A no-op once it has finished."""
        with self._lock:
            if self._streams.get(request_id) is None:
                return
            if self._error is None:
                self._streams[request_id] = None
                self._channel.send(AbortRequest(request_id))
            else:
                del self._streams[request_id]

    def shutdown(self) -> None:
        """Stop the loop (running requests end as aborted, streams fail) and wait for it."""
        self._channel.close(SHUTDOWN_TIMEOUT_S)

    # -- the core's events (on the channel's thread) -----------------------------------------
    def _on_event(self, event: Event) -> None:
        if isinstance(event, StepOutputs):
            self._deliver(event)
        elif isinstance(event, EngineFailed):
            self._fail(EngineDeadError(event.reason))
        else:
            raise TypeError(f"unexpected event {type(event).__name__}")

    def _deliver(self, outputs: StepOutputs) -> None:
        with self._lock:
            self._load = outputs.load
        # Listeners before delivery: a client that saw a token can count on telemetry having
        # the step that made it.
        if outputs.step is not None:
            for step_listener in self._step_listeners:
                step_listener(outputs.step)
        deltas = outputs.deltas
        if not deltas:
            return
        for listener in self._output_listeners:
            listener(deltas)
        mailboxes: list[_Mailbox] = []
        items: list[Item] = []
        with self._lock:
            streams = self._streams
            for d in deltas:
                mailbox = streams.pop(d.request_id, None) if d.finished else streams.get(d.request_id)
                if mailbox is not None:
                    mailboxes.append(mailbox)
                    items.append(d)
        self._post(mailboxes, items)

    def _fail(self, error: EngineDeadError) -> None:
        if self._error is None:
            self._error = error
        with self._lock:
            mailboxes = [mailbox for mailbox in self._streams.values() if mailbox is not None]
        self._post(mailboxes, [error] * len(mailboxes))

    @staticmethod
    def _post(mailboxes: list[_Mailbox], items: list[Item]) -> None:
        """One wake-up per event loop for a whole step's deltas (a server has one loop)."""
        rows_by_loop: dict[asyncio.AbstractEventLoop, list[int]] = {}
        for row, mailbox in enumerate(mailboxes):
            rows_by_loop.setdefault(mailbox.loop, []).append(row)
        for loop, rows in rows_by_loop.items():
            ours = mailboxes if len(rows) == len(mailboxes) else [mailboxes[r] for r in rows]
            theirs = items if len(rows) == len(items) else [items[r] for r in rows]
            try:
                loop.call_soon_threadsafe(_put_all, ours, theirs)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass
