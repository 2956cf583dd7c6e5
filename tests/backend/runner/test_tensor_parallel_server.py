"""Tensor parallelism behind the gRPC server: a real server on a loopback ephemeral port with
2 CPU ranks streams the unsplit model's greedy tokens to the Python client; a killed worker
turns health NOT_SERVING and fails in-flight requests with a clear status instead of hanging;
and neither a drained nor a killed server leaves a worker behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2

from pagedserve.clients.client import GenerationClient
from tests.backend.engine.reference import ReferenceOutput, compare_greedy
from tests.backend.runner.tp_harness import (
    TP_ENGINE,
    assert_gone,
    mixed_params,
    mixed_prompts,
    worker_children,
)
from tests.backend.server.harness import health_or_gone, running_server, wait_for

pytestmark = pytest.mark.timeout(240)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
START_TIMEOUT_S = 120.0
# A dead worker must fail the stream and the health well inside this.
DEATH_NOTICED_S = 10.0
# The server ends by itself after a dead rank: the engine check, then a drain of at most
# the harness's drain_timeout_s (5 s).
SELF_EXIT_S = 30.0


@pytest.fixture(autouse=True)
def no_workers_left() -> Iterator[None]:
    yield
    assert_gone([p.pid for p in worker_children()])


def _stream(client: GenerationClient, prompt: list[int], max_tokens: int) -> ReferenceOutput:
    """One streamed greedy request: its tokens and the top-two logprob gaps."""
    tokens: list[int] = []
    gaps: list[float] = []
    for response in client.generate(
        prompt_token_ids=prompt, max_tokens=max_tokens, temperature=0.0, logprobs=2
    ):
        tokens.extend(response.token_ids)
        gaps.extend(lp.top[0].logprob - lp.top[1].logprob for lp in response.logprobs)
    return ReferenceOutput(tokens, gaps)


def _worker_of(pid: int) -> psutil.Process:
    """The one tensor-parallel worker below process ``pid`` (its child, or its grandchild
    through the engine process)."""
    (worker,) = [
        p for p in psutil.Process(pid).children(recursive=True)
        if "pagedserve.backend.runner.worker" in p.cmdline()
    ]
    return worker


@pytest.mark.parametrize("engine_process", [False, True], ids=["engine thread", "engine process"])
def test_server_streams_tp1_tokens_then_fails_cleanly_when_a_worker_dies(
    tiny_llama_dir: Path, llama_tp1_reference: list[ReferenceOutput], engine_process: bool
) -> None:
    prompts, params = mixed_prompts(), mixed_params()
    with running_server(
        tiny_llama_dir, engine_process=engine_process, tensor_parallel_size=2, **TP_ENGINE
    ) as server:
        with GenerationClient(server.address) as client:
            assert client.health() == SERVING
            # All 8 at once, so prefill chunks and decodes share steps as in the reference.
            with ThreadPoolExecutor(len(prompts)) as pool:
                got = list(pool.map(
                    lambda pp: _stream(client, pp[0], pp[1].max_tokens), zip(prompts, params)
                ))
            compare_greedy([g.token_ids for g in got], llama_tp1_reference)

            engine = server.state.engine
            assert engine is not None
            pid = _worker_of(engine.engine_pid or os.getpid()).pid
            call = client.generate("Keep going", max_tokens=200, ignore_eos=True)
            stream = iter(call)
            next(stream)
            os.kill(pid, signal.SIGKILL)
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                for _ in stream:
                    pass
            assert time.monotonic() - start < DEATH_NOTICED_S
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"rank 1 (pid {pid}) exited with code -9" in info.value.details()
            wait_for(
                lambda: health_or_gone(client) in (NOT_SERVING, None), DEATH_NOTICED_S,
                "NOT_SERVING",
            )
            with pytest.raises(grpc.RpcError) as info:
                client.complete("Anyone?", max_tokens=2)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # A dead rank ends the server, so that its orchestrator starts a fresh one.
        assert server.wait_exit(SELF_EXIT_S) == 1


def _serve(
    model_dir: Path, log: Path, engine_process_flag: str
) -> tuple[subprocess.Popen[bytes], str]:
    """``pagedserve serve --tensor-parallel-size 2`` as a process; returns it and its address."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TP_ENGINE.items()]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "pagedserve.backend.cli", "serve", "--model", str(model_dir),
             "--host", "127.0.0.1", "--port", "0", "--http-port", "0", "--metrics-port", "0", "--drain-timeout", "10",
             "--tensor-parallel-size", "2", engine_process_flag, *flags],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        match = LISTENING.search(log.read_text(errors="replace"))
        if match:
            return process, f"127.0.0.1:{match.group(1)}"
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"serve did not start listening:\n{log.read_text()}")
        time.sleep(0.1)


@pytest.fixture(params=["--no-engine-process", "--engine-process"])
def serve_process(
    tiny_llama_dir: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[subprocess.Popen[bytes], str, list[int]]]:
    """A serving TP=2 server process, its address and the pids of every process below it
    (the worker, and the engine process when it has one)."""
    process, address = _serve(tiny_llama_dir, tmp_path / "serve.log", request.param)
    try:
        with GenerationClient(address) as client:
            client.wait_until_serving(START_TIMEOUT_S)
            reply = client.complete("Hello", max_tokens=4, ignore_eos=True, temperature=0.0)
            assert reply.usage.completion_tokens == 4
        worker = _worker_of(process.pid)
        below = [p.pid for p in psutil.Process(process.pid).children(recursive=True)]
        assert worker.pid in below
        assert len(below) == (2 if request.param == "--engine-process" else 1), below
        yield process, address, below
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)


def test_serve_process_stops_its_worker_on_sigterm(
    serve_process: tuple[subprocess.Popen[bytes], str, list[int]],
) -> None:
    process, _, below = serve_process
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0
    assert_gone(below)


def test_killed_serve_process_leaves_no_orphan_worker(
    serve_process: tuple[subprocess.Popen[bytes], str, list[int]],
) -> None:
    process, _, below = serve_process
    process.kill()
    process.wait(30)
    # The engine process sees its socket close and stops; a worker whose parent is gone
    # notices within a heartbeat interval and exits.
    assert_gone(below)
