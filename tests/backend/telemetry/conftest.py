"""Servers whose spans land in an in-memory exporter, and helpers to read span trees."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from pagedserve.backend.config import EngineConfig, ServerConfig, TelemetryConfig
from pagedserve.backend.server.server import BackgroundServer
from pagedserve.backend.telemetry.exporting import new_tracer_provider
from pagedserve.backend.telemetry.server_telemetry import ServerTelemetry
from tests.backend.server.harness import READY_TIMEOUT_S, TINY_ENGINE

FLUSH_TIMEOUT_S = 10.0
POLL_S = 0.01


class TracedServer:
    """A real server on loopback whose spans (and its clients' spans) go to ``exporter``."""

    def __init__(self, server: BackgroundServer, exporter: InMemorySpanExporter,
                 provider: TracerProvider) -> None:
        self.server = server
        self.exporter = exporter
        self.provider = provider  # give it to clients too: one exporter sees the whole trace

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def telemetry(self) -> ServerTelemetry:
        return self.server.state.telemetry

    def spans(self, servers: int = 0) -> list[ReadableSpan]:
        """Everything finished so far, once at least ``servers`` SERVER spans have ended.

        A client can see its status before the server's handler has returned (an abort sends
        it first), so the RPC's span may still be on its way to the telemetry thread.
        """
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        while True:
            assert self.telemetry.flush(FLUSH_TIMEOUT_S)
            spans = list(self.exporter.get_finished_spans())
            if sum(s.kind == SpanKind.SERVER for s in spans) >= servers:
                return spans
            assert time.monotonic() < deadline, f"fewer than {servers} SERVER spans ended"
            time.sleep(POLL_S)


@contextmanager
def traced_server(
    model_dir: Path,
    *,
    engine_process: bool | None = None,
    server_options: dict[str, Any] | None = None,
    **engine_kwargs: Any,
) -> Iterator[TracedServer]:
    """``server_options``: more ServerConfig fields."""
    exporter = InMemorySpanExporter()
    provider = new_tracer_provider(SimpleSpanProcessor(exporter))
    config = TelemetryConfig(metrics_port=0)
    telemetry = ServerTelemetry(config, provider)
    server = BackgroundServer(
        ServerConfig(
            host="127.0.0.1", port=0, http_port=0, drain_timeout_s=5.0, telemetry=config,
            engine_process=engine_process, **(server_options or {}),
        ),
        EngineConfig.from_kwargs(model=str(model_dir), **{**TINY_ENGINE, **engine_kwargs}),
        telemetry=telemetry,
    )
    server.start()
    try:
        server.wait_ready(READY_TIMEOUT_S)
        yield TracedServer(server, exporter, provider)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def traced(tiny_llama_dir: Path) -> Iterator[TracedServer]:
    with traced_server(tiny_llama_dir) as server:
        yield server


@pytest.fixture(scope="module")
def traced_engine_process(tiny_llama_dir: Path) -> Iterator[TracedServer]:
    with traced_server(tiny_llama_dir, engine_process=True) as server:
        yield server


def _emptied(server: TracedServer) -> TracedServer:
    server.spans()
    server.exporter.clear()
    return server


@pytest.fixture
def fresh(traced: TracedServer) -> TracedServer:
    """The module's server with an empty exporter."""
    return _emptied(traced)


@pytest.fixture(params=["engine thread", "engine process"])
def fresh_either(request: pytest.FixtureRequest) -> TracedServer:
    """``fresh``, with the engine loop on a thread of the server or in its own process."""
    name = "traced" if request.param == "engine thread" else "traced_engine_process"
    return _emptied(request.getfixturevalue(name))


def by_name(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> dict[str, ReadableSpan]:
    """The direct children of ``parent``, by name (each name at most once)."""
    kids = [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]
    named = {s.name: s for s in kids}
    assert len(named) == len(kids), [s.name for s in kids]
    return named


def steps_linking(spans: list[ReadableSpan], target: ReadableSpan) -> list[ReadableSpan]:
    return [
        s for s in by_name(spans, "engine.step")
        if any(link.context.span_id == target.context.span_id for link in s.links)
    ]
