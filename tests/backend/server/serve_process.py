"""``pagedserve serve`` as real processes on loopback ports, for the drain and proxy tests.

Signals, the drain and the exit code only exist in a process of their own. Replicas run the
real command through ``paced_serve`` (every engine step paused ``step_delay_s``), log to a file
(a full pipe would stall them), and are always killed when the test ends, however it ends.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagedserve.v1 import generation_pb2 as pb
from tests.backend.server.harness import TINY_ENGINE

REPO_ROOT = Path(__file__).resolve().parents[3]
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
# Loading (torch import, model, warm-up) on a busy two-core machine; normally 3-5 s.
START_TIMEOUT_S = 180.0
EXIT_TIMEOUT_S = 30.0
POLL_S = 0.05
HEALTH_CALL_TIMEOUT_S = 5.0
WATCH_TIMEOUT_S = 300.0
HEALTH_CHANGE_TIMEOUT_S = 10.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class ServeProcess:
    """One ``pagedserve serve`` process and its log."""

    process: subprocess.Popen[bytes]
    log: Path
    address: str = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def running(self) -> bool:
        return self.process.poll() is None

    def wait_listening(self, timeout_s: float = START_TIMEOUT_S) -> str:
        """The address it listens on, read from its log (it binds port 0)."""
        deadline = time.monotonic() + timeout_s
        while True:
            match = LISTENING.search(self.log_text())
            if match:
                self.address = f"127.0.0.1:{match.group(1)}"
                return self.address
            self._check_alive(deadline, "start listening")

    def wait_serving(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until grpc.health.v1 says SERVING (the model is loaded and warmed)."""
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = health.Check(
                        health_pb2.HealthCheckRequest(), timeout=HEALTH_CALL_TIMEOUT_S
                    )
                    if reply.status == SERVING:
                        return
                except grpc.RpcError as error:
                    if error.code() not in (
                        grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                    ):
                        raise
                self._check_alive(deadline, "report SERVING")

    def wait_exit(self, timeout_s: float = EXIT_TIMEOUT_S) -> int:
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"pid {self.pid} still running {timeout_s} s later; log:\n{self.log_text()}"
            ) from None

    def kill(self) -> None:
        if self.running():
            self.process.kill()
        self.process.wait(EXIT_TIMEOUT_S)

    def _check_alive(self, deadline: float, what: str) -> None:
        if self.process.poll() is not None:
            raise AssertionError(
                f"serve exited ({self.process.returncode}) before it could {what}; "
                f"log:\n{self.log_text()}"
            )
        if time.monotonic() > deadline:
            self.kill()
            raise AssertionError(f"serve did not {what} in time; log:\n{self.log_text()}")
        time.sleep(POLL_S)


def launch(
    model_dir: Path,
    log: Path,
    *,
    step_delay_s: float,
    drain_timeout_s: float,
    extra_flags: Sequence[str] = (),
) -> ServeProcess:
    """Start ``pagedserve serve`` (returns at once; see ``wait_listening``/``wait_serving``)."""
    engine_flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_ENGINE.items()]
    command = [
        sys.executable, "-m", "tests.backend.server.paced_serve", str(step_delay_s),
        "serve", "--model", str(model_dir), "--device", "cpu",
        "--host", "127.0.0.1", "--port", "0", "--http-port", "0",
        "--metrics-host", "127.0.0.1", "--metrics-port", "0",
        "--drain-timeout", str(drain_timeout_s),
        *engine_flags, *extra_flags,
    ]
    # One intra-op thread: the tiny model gains nothing from more, and replicas share 2 cores.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    return ServeProcess(process, log)


@contextmanager
def serving(
    model_dirs: Sequence[Path], log_dir: Path, **launch_kwargs: Any
) -> Iterator[list[ServeProcess]]:
    """One SERVING replica per model directory, started side by side; all killed on exit."""
    with ExitStack() as stack:
        replicas: list[ServeProcess] = []
        for index, model_dir in enumerate(model_dirs):
            replica = launch(model_dir, log_dir / f"serve-{index}.log", **launch_kwargs)
            stack.callback(replica.kill)
            replicas.append(replica)
        for replica in replicas:
            replica.wait_listening()
        for replica in replicas:
            replica.wait_serving()
        yield replicas


@dataclass
class StreamReader:
    """Reads one Generate stream on a thread: every message, and how and when it ended."""

    call: Any  # the grpc call: an iterator of GenerateResponse that can be cancelled
    responses: list[pb.GenerateResponse] = field(default_factory=list)
    error: grpc.RpcError | None = None
    ended_at: float | None = None
    first_message: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for response in self.call:
                self.responses.append(response)
                self.first_message.set()
        except grpc.RpcError as error:
            self.error = error
        finally:
            self.ended_at = time.monotonic()

    def wait_first_message(self, timeout_s: float) -> None:
        if not self.first_message.wait(timeout_s):
            raise AssertionError(f"no message within {timeout_s} s (error: {self.error})")

    def join(self, timeout_s: float) -> None:
        assert self._thread is not None
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self.call.cancel()
            raise AssertionError(f"stream still open after {timeout_s} s")

    @property
    def token_ids(self) -> list[int]:
        return [t for response in list(self.responses) for t in response.token_ids]

    @property
    def final(self) -> pb.GenerateResponse:
        assert self.responses, f"the stream sent nothing (error: {self.error})"
        return self.responses[-1]


class HealthWatch:
    """A grpc.health.v1 Watch on the whole server, read on a thread (open it before the
    signal: a draining server accepts no new connection)."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.insecure_channel(address)
        stub = health_pb2_grpc.HealthStub(self._channel)
        self.call = stub.Watch(health_pb2.HealthCheckRequest(), timeout=WATCH_TIMEOUT_S)
        self.statuses: list[int] = []
        self.changed = threading.Condition()
        self.ended = threading.Event()
        self.error: grpc.RpcError | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for reply in self.call:
                with self.changed:
                    self.statuses.append(reply.status)
                    self.changed.notify_all()
        except grpc.RpcError as error:
            self.error = error
        finally:
            self.ended.set()

    def wait_for(self, status: int, timeout_s: float = HEALTH_CHANGE_TIMEOUT_S) -> None:
        with self.changed:
            if not self.changed.wait_for(lambda: status in self.statuses, timeout_s):
                raise AssertionError(f"health never said {status}: {self.statuses}")

    def close(self) -> None:
        self.call.cancel()
        self._channel.close()

    def __enter__(self) -> "HealthWatch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
