"""The engine's step loop, and the two places it can run: a thread of this process, or a
process of its own (``engine_process.py``).

The loop owns the engine: it alone touches scheduling state. Adds and aborts reach it through a
thread-safe inbox; everything it produces leaves through an ``EngineSink``, once per step: the
step's deltas, what the step did and the load after it. The asyncio front (``AsyncEngine``) is
the sink, directly when the loop is a thread, through a socket when it is a process.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Protocol

from pagedserve.backend.engine.engine import LLMEngine, LoadInfo, ModelInfo, StepInfo
from pagedserve.backend.engine.request import Request, RequestOutputDelta
from pagedserve.backend.engine.request_builder import RequestBuilder
from pagedserve.backend.errors import EngineDeadError, PagedServeError

logger = logging.getLogger(__name__)

# The loop sleeps at most this long without work before it looks at its stop flag again.
IDLE_WAIT_S = 1.0


class EngineSink(Protocol):
    """Where the loop's output goes. Called from the loop's thread (``fail`` also from a
    tensor-parallel monitor thread)."""

    def deliver(
        self,
        deltas: list[RequestOutputDelta],
        step: StepInfo | None,
        load: LoadInfo,
        adds_taken: int,
    ) -> None:
        """One step's deltas (aborts included), the step (None when none ran), the load after
        it, and how many queued adds the loop took in since its last delivery."""

    def reject(self, request_id: str, error: PagedServeError) -> None:
        """A queued add the engine refused."""

    def fail(self, error: EngineDeadError) -> None:
        """The engine can run nothing more (it died, or it shut down): fail every request."""


class EngineLoop:
    """Adds and aborts in, one ``deliver`` per step out, until stopped or broken."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        # A Request to add, or the id of one to abort.
        self._inbox: queue.SimpleQueue[Request | str] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False

    def add(self, request: Request) -> None:
        self._inbox.put(request)
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self._inbox.put(request_id)
        self._wake.set()

    def stop(self) -> None:
        """``run`` aborts every request, fails the sink and returns (within one step)."""
        self._stop = True
        self._wake.set()

    def run(self, sink: EngineSink) -> None:
        engine = self.engine
        engine.add_failure_listener(
            lambda reason: sink.fail(EngineDeadError(f"the engine has stopped: {reason}"))
        )
        last_step: StepInfo | None = None
        try:
            while not self._stop:
                deltas, adds_taken = self._drain_inbox(sink)
                if not engine.has_unfinished():
                    if deltas or adds_taken:
                        sink.deliver(deltas, None, engine.get_load(), adds_taken)
                    self._wake.wait(timeout=IDLE_WAIT_S)
                    self._wake.clear()
                    continue
                deltas += engine.step()
                step = engine.last_step if engine.last_step is not last_step else None
                last_step = engine.last_step
                sink.deliver(deltas, step, engine.get_load(), adds_taken)
        except BaseException as exc:  # the loop itself broke: fail everyone, clearly
            logger.exception("engine loop died")
            sink.fail(EngineDeadError(f"the engine loop died: {exc}"))
            return
        final = [engine.abort(request_id) for request_id in list(engine.requests)]
        sink.deliver([d for d in final if d is not None], None, engine.get_load(), 0)
        sink.fail(EngineDeadError("the engine has shut down"))

    def _drain_inbox(self, sink: EngineSink) -> tuple[list[RequestOutputDelta], int]:
        """Apply queued adds and aborts: the aborts' final deltas and the number of adds."""
        deltas: list[RequestOutputDelta] = []
        adds = 0
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return deltas, adds
            if isinstance(item, Request):
                adds += 1
                self._add(item, sink)
            else:
                delta = self.engine.abort(item)
                if delta is not None:
                    deltas.append(delta)

    def _add(self, request: Request, sink: EngineSink) -> None:
        """Two fronts' checks can race (a stream closed, its abort not yet applied): the
        engine's own check refuses an id that is still running."""
        try:
            self.engine.add_request(request)
        except PagedServeError as exc:
            sink.reject(request.request_id, exc)


class EngineThread:
    """The loop on a thread of this process: no copies between the engine and the server, but
    one GIL for both (see ``engine_process.py`` for the other way)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine: LLMEngine | None = engine
        self.model_info: ModelInfo = engine.model_info
        self.builder: RequestBuilder = engine.builder
        self.max_queued_requests = engine.config.scheduler.max_queued_requests
        self.initial_load: LoadInfo = engine.get_load()
        self._loop = EngineLoop(engine)
        self._thread: threading.Thread | None = None

    def start(self, sink: EngineSink) -> None:
        self._thread = threading.Thread(
            target=self._loop.run, args=(sink,), name="pagedserve-engine", daemon=True
        )
        self._thread.start()

    @property
    def pid(self) -> None:
        return None  # this process

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def add(self, request: Request) -> None:
        self._loop.add(request)

    def abort(self, request_id: str) -> None:
        self._loop.abort(request_id)

    def shutdown(self, timeout_s: float) -> None:
        self._loop.stop()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
        self._loop.engine.shutdown()
