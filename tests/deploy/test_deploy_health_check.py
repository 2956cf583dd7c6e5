"""The Docker HEALTHCHECK script against a real grpc.health.v1 server on loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.deploy.kustomize_render import DEPLOY

SCRIPT = DEPLOY / "docker/grpc_health_check.py"
SERVICE = "pagedserve.v1.Generation"


@pytest.fixture
def health_server() -> Iterator[tuple[int, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, servicer
    server.stop(grace=None)


def _probe(port: int, *extra: str) -> int:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--port", str(port), "--timeout", "2", *extra],
        capture_output=True,
        timeout=30,
    )
    return result.returncode


def test_healthy_only_while_serving(health_server: tuple[int, health.HealthServicer]) -> None:
    port, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert _probe(port) == 0
    # A named service is checked on its own, and an unknown one is unhealthy (NOT_FOUND).
    assert _probe(port, "--service", SERVICE) == 1
    assert _probe(port, "--service", "no.such.Service") == 1
    # Draining: the server flips the overall status.
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert _probe(port) == 1


def test_unhealthy_when_nothing_listens() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    assert _probe(port) == 1
