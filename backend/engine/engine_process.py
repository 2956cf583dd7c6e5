"""The engine loop in a process of its own, behind a socket pair.

Why: a server streaming to hundreds of clients spends most of a step's wall time in Python on
the event loop (gRPC writes), and the engine thread needs the same interpreter lock for
scheduling, batch building and detokenization. On a GPU that lock, not the device, set the pace
(BENCHMARKS.md: the engine thread held it for 43% of a step). In its own process the loop has
its own lock; the server's process only tokenizes, validates and streams.

The engine process is a fresh interpreter (``python -m pagedserve.backend.engine.engine_process``,
like the tensor-parallel workers): it never re-runs the caller's main script, as
``multiprocessing``'s spawn would, and inherits nothing of this process (CUDA least of all).
They talk over a socket pair wrapped as ``multiprocessing`` connections, one pickled tuple per
message:

- server -> engine, first: the ``EngineConfig``;
- engine -> server: ``("ready", _Ready)`` once loaded, or ``("failed", error)``; then
  ``("deliver", deltas, step, load, adds_taken)`` once per step, ``("reject", request_id,
  error)``, ``("fail", error)``, and ``("exited",)`` last;
- server -> engine: ``("add", Request)``, ``("abort", request_id)``, ``("stop",)``.

The child watches the pipe: if the server's process goes away, the engine stops and exits.
The server's side watches it too: an engine process that dies fails every request at once.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from pagedserve.backend.config import EngineConfig
from pagedserve.backend.engine.engine import LLMEngine, LoadInfo, ModelInfo, StepInfo, relax_gc
from pagedserve.backend.engine.engine_loop import EngineLoop, EngineSink
from pagedserve.backend.engine.request import Request, RequestOutputDelta
from pagedserve.backend.engine.request_builder import RequestBuilder
from pagedserve.backend.errors import EngineDeadError, PagedServeError

logger = logging.getLogger(__name__)

_MODULE = "pagedserve.backend.engine.engine_process"


@dataclass
class _Ready:
    model_info: ModelInfo
    builder: RequestBuilder
    max_queued_requests: int
    load: LoadInfo


class EngineProcessError(PagedServeError):
    """The engine process failed to start."""


class EngineProcess:
    """The server's handle on an engine loop running in a child process."""

    engine: LLMEngine | None = None  # the engine lives in the other process

    def __init__(self, config: EngineConfig) -> None:
        """Blocking: starts the process and waits until its model is loaded."""
        # This process now makes thousands of short-lived objects per step (deltas, protobuf
        # messages) beside a large heap: at the default thresholds the collector's full passes
        # measured as a fifth of the server's time under 256 streams.
        relax_gc()
        ours, theirs = socket.socketpair()
        with ours, theirs:
            self._process = subprocess.Popen(
                [sys.executable, "-m", _MODULE, "--fd", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
            )
            self._conn = Connection(ours.detach())
        self._conn.send(config)
        self._send_lock = threading.Lock()
        self._closing = False
        self._reader: threading.Thread | None = None
        ready = self._wait_ready()
        self.model_info: ModelInfo = ready.model_info
        self.builder: RequestBuilder = ready.builder
        self.max_queued_requests = ready.max_queued_requests
        self.initial_load: LoadInfo = ready.load

    def _wait_ready(self) -> _Ready:
        try:
            kind, body = self._conn.recv()
        except (EOFError, OSError):
            raise EngineProcessError(
                f"the engine process exited while loading (exit code {self._exit_code()})"
            ) from None
        if kind == "failed":
            self._exit_code()
            self._conn.close()
            raise body
        return body

    def _exit_code(self, timeout_s: float = 30.0) -> int | None:
        """Wait (bounded) for the process to end: its exit code, negative for a signal."""
        try:
            return self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def is_alive(self) -> bool:
        return self._process.poll() is None

    def start(self, sink: EngineSink) -> None:
        self._reader = threading.Thread(
            target=self._read, args=(sink,), name="pagedserve-engine-reader", daemon=True
        )
        self._reader.start()

    def add(self, request: Request) -> None:
        self._send(("add", request))

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def shutdown(self, timeout_s: float) -> None:
        """Stop the loop (its requests end as aborted), then wait for the process to exit."""
        self._closing = True
        self._send(("stop",))
        if self._reader is not None:
            self._reader.join(timeout=timeout_s)
        if self._exit_code(timeout_s) is None:
            logger.warning("the engine process did not exit in %.0f s: killing it", timeout_s)
            self._process.kill()
            self._exit_code()
        self._conn.close()

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError):  # the process is gone (the reader reports it) or closed
            pass

    def _read(self, sink: EngineSink) -> None:
        """Hand every message from the engine to the sink, in order, until the process ends."""
        try:
            while True:
                kind, *body = self._conn.recv()
                if kind == "deliver":
                    wire, step, load, adds_taken = body
                    sink.deliver([_decode(d) for d in wire], step, load, adds_taken)
                elif kind == "reject":
                    sink.reject(*body)
                elif kind == "fail":
                    sink.fail(*body)
                elif kind == "exited":
                    return
        except (EOFError, OSError):
            if self._closing:
                return
        sink.fail(
            EngineDeadError(
                f"the engine process exited unexpectedly (exit code {self._exit_code(5.0)})"
            )
        )


class _PipeSink:
    """The loop's sink inside the engine process: each call becomes one message."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()  # the loop and a tensor-parallel monitor both send

    def send(self, message: tuple[Any, ...]) -> None:
        try:
            with self._lock:
                self._conn.send(message)
        except (OSError, ValueError):  # the server's process is gone; the reader stops us
            pass

    def deliver(
        self, deltas: list[RequestOutputDelta], step: StepInfo | None, load: LoadInfo, adds_taken: int
    ) -> None:
        self.send(("deliver", [_encode(d) for d in deltas], step, load, adds_taken))

    def reject(self, request_id: str, error: PagedServeError) -> None:
        self.send(("reject", request_id, error))

    def fail(self, error: EngineDeadError) -> None:
        self.send(("fail", error))


# A delta in the middle of a stream is its id, text and token ids: sent as a plain tuple it
# pickles and unpickles about ten times faster than the dataclass (measured: 256 deltas, 276 us
# to pickle as objects, 27 us as tuples).
_PlainDelta = tuple[str, str, list[int]]


def _encode(delta: RequestOutputDelta) -> RequestOutputDelta | _PlainDelta:
    if delta.logprobs is None and not delta.finished and delta.error is None:
        return (delta.request_id, delta.text, delta.token_ids)
    return delta  # final deltas and logprobs keep every field


def _decode(item: RequestOutputDelta | _PlainDelta) -> RequestOutputDelta:
    return RequestOutputDelta(*item) if type(item) is tuple else item


def _portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling, else an EngineProcessError that names it."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return EngineProcessError(f"{type(error).__name__}: {error}")
    return error


def _read_commands(conn: Connection, loop: EngineLoop) -> None:
    """The engine process's reader: commands from the server into the loop's inbox."""
    try:
        while True:
            kind, *body = conn.recv()
            if kind == "add":
                loop.add(body[0])
            elif kind == "abort":
                loop.abort(body[0])
            elif kind == "stop":
                break
    except (EOFError, OSError):
        logger.warning("the server's process is gone: stopping the engine")
    loop.stop()


def run_engine_process(conn: Connection) -> None:
    """The engine process: read the config, load, report ready, run the loop until stopped."""
    started = time.monotonic()
    try:
        config: EngineConfig = conn.recv()
    except (EOFError, OSError):
        return  # the server's process went away before it sent anything
    try:
        engine = LLMEngine(config)
    except BaseException as exc:
        logger.exception("the engine failed to load")
        conn.send(("failed", _portable(exc)))
        conn.close()
        return
    loop = EngineLoop(engine)
    sink = _PipeSink(conn)
    ready = _Ready(
        model_info=engine.model_info,
        builder=engine.builder,
        max_queued_requests=config.scheduler.max_queued_requests,
        load=engine.get_load(),
    )
    sink.send(("ready", ready))
    logger.info("engine process ready in %.1f s", time.monotonic() - started)
    threading.Thread(
        target=_read_commands, args=(conn, loop), name="pagedserve-engine-commands", daemon=True
    ).start()
    try:
        loop.run(sink)
    finally:
        engine.shutdown()
        sink.send(("exited",))
        conn.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="pagedserve's engine process (started by the server)")
    parser.add_argument("--fd", type=int, required=True, help="the socket to the server's process")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The server owns the signals: Ctrl-C reaches the whole process group, and the engine must
    # keep stepping while the server drains its streams.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    run_engine_process(Connection(args.fd))


if __name__ == "__main__":
    # Run the importable module's main, not this copy's: what crosses the socket must pickle
    # under the module's name, not "__main__".
    from pagedserve.backend.engine.engine_process import main as module_main

    module_main()
