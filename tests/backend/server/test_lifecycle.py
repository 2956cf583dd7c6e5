"""Server phases: listening before the model loads, health, reflection, load failure, drain."""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from pagedserve.backend.config import EngineConfig, ServerConfig, TelemetryConfig
from pagedserve.backend.server.generation_service import SERVICE_NAME
from pagedserve.backend.server.server import BackgroundServer
from pagedserve.clients.client import GenerationClient
from tests.backend.server.harness import (
    TINY_ENGINE,
    SlowSteps,
    gated_model_loading,
    health_or_gone,
    wait_for,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _server(model: Path | str, **server_kwargs: Any) -> BackgroundServer:
    return BackgroundServer(
        ServerConfig(
            host="127.0.0.1", port=0, telemetry=TelemetryConfig(metrics_port=0),
            **{"drain_timeout_s": 5.0, "http_port": 0, **server_kwargs},
        ),
        EngineConfig.from_kwargs(model=str(model), **TINY_ENGINE),
    )


@pytest.fixture
def gated_loading(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    with gated_model_loading(monkeypatch, 60) as gate:
        yield gate


def test_health_goes_not_serving_to_serving(
    tiny_llama_dir: Path, gated_loading: threading.Event
) -> None:
    with _server(tiny_llama_dir) as server, GenerationClient(server.address) as client:
        with grpc.insecure_channel(server.address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME)
            )
            updates = iter(watch)
            assert next(updates).status == NOT_SERVING
            # Loading: the port answers, health says NOT_SERVING, generation is UNAVAILABLE.
            assert client.health() == NOT_SERVING
            assert client.health(SERVICE_NAME) == NOT_SERVING
            for call in (
                lambda: list(client.generate("Hi", max_tokens=2)),
                lambda: client.complete("Hi", max_tokens=2),
                lambda: client.load(),
                lambda: client.model_info(),
            ):
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "loading" in info.value.details()
            gated_loading.set()
            client.wait_until_serving(60)
            assert next(updates).status == SERVING
            watch.cancel()
        assert client.health(SERVICE_NAME) == SERVING
        assert client.complete("Hi", max_tokens=2).usage.completion_tokens == 2
        with pytest.raises(grpc.RpcError) as info:
            client.health("no.such.Service")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(tiny_server: BackgroundServer) -> None:
    with grpc.insecure_channel(tiny_server.address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= services
        proto = db.FindFileContainingSymbol(SERVICE_NAME)
        assert proto.name == "pagedserve/v1/generation.proto"
        methods = {m.name for s in proto.service for m in s.method}
        assert methods == {"Generate", "Complete", "Tokenize", "GetModelInfo", "GetLoad"}


# A server ending by itself drains for at most drain_timeout_s (5 s here) after the engine
# check (50 ms here) or the failed load; loading the tiny model's tokenizer takes seconds.
SELF_EXIT_S = 30.0


def test_failed_load_ends_the_server_with_its_cause(tmp_path: Path) -> None:
    server = _server(tmp_path / "no-such-model")
    server.start()
    try:
        assert server.wait_exit(SELF_EXIT_S) == 1
        assert server.state.fatal is not None
        assert server.state.fatal.startswith("the model failed to load: ModelLoadError")
        assert "no-such-model" in server.state.fatal
    finally:
        server.stop()


def test_failed_load_keeps_answering_unavailable_when_asked_to(tmp_path: Path) -> None:
    server = _server(tmp_path / "no-such-model", exit_on_load_error=False)
    server.start()
    try:
        with GenerationClient(server.address) as client:
            wait_for(lambda: server.state.load_error is not None, 60, "the load to fail")
            assert client.health() == NOT_SERVING
            with pytest.raises(grpc.RpcError) as info:
                client.complete("Hi", max_tokens=2)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "failed to load" in info.value.details()
            assert server.wait_exit(1.0) is None  # still listening
    finally:
        server.stop()
    assert server.exit_code == 1 and server.state.fatal is None


def test_dead_engine_turns_health_not_serving_and_ends_the_server(tiny_llama_dir: Path) -> None:
    with _server(tiny_llama_dir, engine_check_interval_s=0.05) as server:
        server.wait_ready()
        with GenerationClient(server.address) as client:
            assert client.health() == SERVING
            engine = server.state.engine
            assert engine is not None
            engine.shutdown()
            wait_for(
                lambda: health_or_gone(client) in (NOT_SERVING, None), 5,
                "health to follow the engine",
            )
            with pytest.raises(grpc.RpcError) as info:
                client.complete("Hi", max_tokens=2)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server.wait_exit(SELF_EXIT_S) == 1
        assert server.state.fatal == "the engine has stopped: the engine has shut down"


def test_a_killed_engine_process_fails_streams_unavailable_and_ends_the_server(
    tiny_llama_dir: Path,
) -> None:
    """With the engine in its own process, its death reaches clients as UNAVAILABLE (another
    replica can serve them), health turns NOT_SERVING and the server ends with exit code 1, so
    that its orchestrator starts a fresh one."""
    with _server(tiny_llama_dir, engine_check_interval_s=0.05, engine_process=True) as server:
        server.wait_ready()
        engine = server.state.engine
        assert engine is not None and engine.engine_pid is not None
        with GenerationClient(server.address) as client:
            assert client.health() == SERVING
            stream = iter(client.generate("Keep going", max_tokens=400, ignore_eos=True))
            next(stream)
            os.kill(engine.engine_pid, signal.SIGKILL)
            with pytest.raises(grpc.RpcError) as info:
                list(stream)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "exited unexpectedly" in info.value.details()
            wait_for(
                lambda: health_or_gone(client) in (NOT_SERVING, None), 5,
                "health to follow the engine",
            )
            with pytest.raises(grpc.RpcError) as info:
                client.complete("Hi", max_tokens=2)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server.wait_exit(SELF_EXIT_S) == 1
        assert server.state.fatal is not None and "exited unexpectedly" in server.state.fatal


def _accepts_connections(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1.0).close()
    except OSError:
        return False
    return True


def test_stop_drains_in_flight_requests(tiny_llama_dir: Path) -> None:
    server = _server(tiny_llama_dir)
    server.start()
    server.wait_ready()
    slow = SlowSteps(server, 0.02)
    client = GenerationClient(server.address)
    try:
        with slow.on():
            call = client.generate("Keep going", max_tokens=40, ignore_eos=True)
            stream = iter(call)
            first = next(stream)
            stopper = threading.Thread(target=server.stop)
            # Held, the first request cannot finish (and so the server cannot close) before
            # the new one has its answer.
            with slow.held():
                stopper.start()
                wait_for(lambda: server.state.draining, 5, "the drain to start")
                # Once the listener has closed: a call sent in the instant the server stops can
                # be cancelled by gRPC core instead (grpc/grpc#41785), whatever the server does.
                wait_for(lambda: not _accepts_connections(server.address), 5, "the listener to close")
                # New work is refused while the in-flight request runs to its end.
                with pytest.raises(grpc.RpcError) as info:
                    client.complete("New", max_tokens=2)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            rest = list(stream)
            stopper.join(30)
        tokens = len(first.token_ids) + sum(len(r.token_ids) for r in rest)
        assert tokens == 40 and rest[-1].usage.completion_tokens == 40
        assert server.exit_code == 0
    finally:
        client.close()
        server.stop()
