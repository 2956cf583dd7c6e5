"""The telemetry thread: the engine and the event loop post, it does the work.

The engine thread's listeners only enqueue (one put per step and one per delivery), so metrics
and spans never lengthen a step; the event loop posts two messages per traced RPC. Items are
handled in the order they were posted, which is what lets step spans link to requests that
the event loop registered just before handing them to the engine.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pagedserve.backend.engine.request import RequestOutputDelta
from pagedserve.backend.telemetry.metrics import ServingMetrics
from pagedserve.backend.telemetry.tracing import RequestTracer, RpcBegun, RpcEnded

if TYPE_CHECKING:
    from pagedserve.backend.engine.messages import StepInfo

logger = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class _StepDone:
    info: StepInfo


@dataclass(frozen=True, slots=True)
class _OutputsDelivered:
    deltas: Sequence[RequestOutputDelta]
    at: float  # time.time() of the delivery


@dataclass(frozen=True, slots=True)
class _Flush:
    done: threading.Event


@dataclass(frozen=True, slots=True)
class _Stop:
    pass


_Item = _StepDone | _OutputsDelivered | RpcBegun | RpcEnded | _Flush | _Stop


class Observer:
    """Owns the telemetry thread; ``tracer`` and ``metrics`` are each optional."""

    def __init__(
        self, tracer: RequestTracer | None, metrics: ServingMetrics | None, poll_s: float
    ) -> None:
        self._tracer = tracer
        self._metrics = metrics
        self._poll_s = poll_s
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="pagedserve-telemetry", daemon=True)
        self._last_step: StepInfo | None = None

    def start(self) -> None:
        self._thread.start()

    def post(self, item: RpcBegun | RpcEnded) -> None:
        self._queue.put(item)

    # -- engine-thread listeners ----------------------------------------------------------------
    def on_step(self, info: StepInfo) -> None:
        if info is self._last_step:  # an empty step reports the previous one again
            return
        self._last_step = info
        self._queue.put(_StepDone(info))

    def on_outputs(self, deltas: Sequence[RequestOutputDelta]) -> None:
        self._queue.put(_OutputsDelivered(deltas, time.time()))

    # -- control ------------------------------------------------------------------------------------
    def flush(self, timeout_s: float) -> bool:
        """Wait until everything posted so far has been handled."""
        if not self._thread.is_alive():
            return False
        done = threading.Event()
        self._queue.put(_Flush(done))
        return done.wait(timeout_s)

    def stop(self, timeout_s: float) -> None:
        """Handle what is queued, finish every open request span, and end the thread."""
        if self._thread.is_alive():
            self._queue.put(_Stop())
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            item: _Item | None
            try:
                item = self._queue.get(timeout=self._poll_s)
            except queue.Empty:
                item = None
            if isinstance(item, _Stop):
                break
            try:
                if item is not None:
                    self._handle(item)
                if self._tracer is not None:
                    self._tracer.expire(time.monotonic())
            except Exception:  # telemetry must never take the server down
                logger.exception("telemetry failed on %s", type(item).__name__ if item else "expiry")
        if self._tracer is not None:
            self._tracer.close()

    def _handle(self, item: _Item) -> None:
        tracer, metrics = self._tracer, self._metrics
        if isinstance(item, _StepDone):
            if metrics is not None:
                metrics.on_step(item.info)
            if tracer is not None:
                tracer.on_step(item.info)
        elif isinstance(item, _OutputsDelivered):
            if metrics is not None:
                metrics.on_outputs(item.deltas, item.at)
            if tracer is not None:
                for delta in item.deltas:
                    if delta.finished:
                        tracer.on_finished(delta)
        elif isinstance(item, RpcBegun):
            assert tracer is not None
            tracer.on_begin(item.trace)
        elif isinstance(item, RpcEnded):
            assert tracer is not None
            tracer.on_rpc_end(item.trace)
        elif isinstance(item, _Flush):
            item.done.set()
