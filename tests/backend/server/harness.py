"""Real gRPC servers on 127.0.0.1 ephemeral ports, for the server and client tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from pagedserve.backend.config import EngineConfig, ServerConfig, TelemetryConfig
from pagedserve.backend.engine.client import EngineClient
from pagedserve.backend.server.server import BackgroundServer
from pagedserve.clients.client import GenerationClient

# Small enough to load in about a second, large enough for 32 concurrent short requests.
TINY_ENGINE: dict[str, Any] = {
    "block_size": 16,
    "num_blocks": 256,
    "max_num_seqs": 32,
    "max_num_batched_tokens": 512,
}
READY_TIMEOUT_S = 120.0
POLL_S = 0.02


@contextmanager
def running_server(
    model_dir: Path | None,
    *,
    warmup: bool = True,
    engine_process: bool | None = None,
    server_options: Mapping[str, Any] | None = None,
    telemetry_options: Mapping[str, Any] | None = None,
    **engine_kwargs: Any,
) -> Iterator[BackgroundServer]:
    """A started and ready server on an ephemeral loopback port; ``server_options`` and
    ``telemetry_options`` are ServerConfig and TelemetryConfig fields."""
    config = EngineConfig.from_kwargs(
        model=None if model_dir is None else str(model_dir), **engine_kwargs
    )
    server_config = ServerConfig(
        host="127.0.0.1", port=0, drain_timeout_s=5.0, warmup=warmup,
        engine_process=engine_process,
        # The HTTP API and metrics on free ports, not 8000 and 8002.
        http_port=0,
        telemetry=TelemetryConfig(metrics_port=0, **(telemetry_options or {})),
        **(server_options or {}),
    )
    server = BackgroundServer(server_config, config)
    server.start()
    try:
        server.wait_ready(READY_TIMEOUT_S)
        yield server
    finally:
        server.stop()


@contextmanager
def gated_model_loading(
    monkeypatch: pytest.MonkeyPatch, timeout_s: float
) -> Iterator[threading.Event]:
    """Model loading waits for the returned event, so a test sees the loading phase."""
    gate = threading.Event()
    load = EngineClient.from_config

    def gated(config: EngineConfig, stream_interval: int = 1, **options: Any) -> EngineClient:
        assert gate.wait(timeout_s), "test never released model loading"
        return load(config, stream_interval, **options)

    monkeypatch.setattr(EngineClient, "from_config", staticmethod(gated))
    try:
        yield gate
    finally:
        gate.set()


def health_or_gone(client: GenerationClient) -> int | None:
    """Health, or None once the server (ending by itself, say after its engine died) no
    longer answers."""
    try:
        return client.health()
    except grpc.RpcError:
        return None


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(POLL_S)


def all_blocks_free(client: GenerationClient) -> bool:
    load = client.load()
    return (
        load.num_free_blocks == load.num_total_blocks
        and load.num_running == 0
        and load.num_waiting == 0
    )


_HOLD_LIMIT_S = 30.0


class SlowSteps:
    """Makes every engine step take at least ``delay_s`` while enabled, so a request is
    reliably still running when a test cancels it or lets its deadline pass. Records the
    steps it slowed (``StepInfo``: start time and the request ids it ran)."""

    def __init__(self, server: BackgroundServer, delay_s: float) -> None:
        self.enabled = threading.Event()
        self.steps: list[Any] = []
        self._delay_s = delay_s
        self._released = threading.Event()
        self._released.set()
        engine = server.state.engine
        assert engine is not None
        engine.add_step_listener(self._on_step)

    def _on_step(self, info: Any) -> None:
        # Bounded, so a failing test cannot leave the engine thread stuck.
        self._released.wait(_HOLD_LIMIT_S)
        if self.enabled.is_set():
            self.steps.append(info)
            time.sleep(self._delay_s)

    @contextmanager
    def held(self) -> Iterator[None]:
        """The engine stops after its current step until the block exits, so whatever the
        test does meanwhile cannot race with running requests finishing."""
        self._released.clear()
        try:
            yield
        finally:
            self._released.set()

    def steps_running(self, request_id: str, after: float) -> int:
        """How many recorded steps that started after ``after`` (time.time()) ran the request."""
        return sum(1 for s in self.steps if s.start > after and request_id in s.request_ids)

    @contextmanager
    def on(self) -> Iterator[None]:
        self.enabled.set()
        try:
            yield
        finally:
            self.enabled.clear()
