"""Ranks started separately, as across nodes: ``pagedserve worker`` processes join a rank 0
that finds them through torch.distributed's MASTER_ADDR, MASTER_PORT, WORLD_SIZE and RANK
(all on loopback here) instead of spawning its own."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.backend.cli import main as cli_main
from pagedserve.backend.errors import EngineDeadError, ModelLoadError
from tests.backend.engine.reference import ReferenceOutput, compare_greedy
from tests.backend.runner.tp_harness import (
    TP_ENGINE,
    generate_with_gaps,
    mixed_params,
    mixed_prompts,
    worker_children,
)

pytestmark = pytest.mark.timeout(240)

EXIT_TIMEOUT_S = 30.0

StartWorker = Callable[..., "subprocess.Popen[bytes]"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _dist_env(port: int, rank: int, world: int = 2) -> dict[str, str]:
    return {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(world),
        "RANK": str(rank),
    }


@pytest.fixture
def rank0_env(monkeypatch: pytest.MonkeyPatch) -> int:
    """This process becomes rank 0 of a 2-rank group on a free loopback port."""
    port = _free_port()
    for key, value in _dist_env(port, 0).items():
        monkeypatch.setenv(key, value)
    return port


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[StartWorker]:
    """``start(port, *args) -> Popen`` of ``pagedserve worker`` as rank 1; killed at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def start(port: int, *args: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, **_dist_env(port, 1)}
        log = open(tmp_path / f"worker{len(started)}.log", "wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "pagedserve.backend.cli", "worker", *args],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(EXIT_TIMEOUT_S)


def test_worker_joins_rank0_through_the_environment(
    tiny_llama_dir: Path,
    rank0_env: int,
    start_worker: StartWorker,
    llama_tp1_reference: list[ReferenceOutput],
) -> None:
    worker = start_worker(rank0_env, "--model", str(tiny_llama_dir), "--tensor-parallel-size", "2")
    prompts, params = mixed_prompts(), mixed_params()
    with LLM(str(tiny_llama_dir), tensor_parallel_size=2, **TP_ENGINE) as split:
        # Rank 0 waited for the worker instead of starting one of its own.
        assert split.engine.runner.leader.worker_pids == []
        assert [p.pid for p in worker_children()] == [worker.pid]
        got = generate_with_gaps(split, prompts, params)
    assert worker.wait(EXIT_TIMEOUT_S) == 0, "the worker did not stop cleanly with rank 0"
    compare_greedy([g.token_ids for g in got], llama_tp1_reference)


def test_worker_that_cannot_load_fails_rank0_clearly(
    tiny_llama_dir: Path, rank0_env: int, start_worker: StartWorker, tmp_path: Path
) -> None:
    missing = tmp_path / "not-here"
    worker = start_worker(rank0_env, "--model", str(missing))
    with pytest.raises(ModelLoadError, match=r"rank 1 failed to load: ModelLoadError: .*not-here"):
        LLM(str(tiny_llama_dir), tensor_parallel_size=2, **TP_ENGINE)
    assert worker.wait(EXIT_TIMEOUT_S) != 0


def test_rank0_environment_must_match_the_split(
    tiny_llama_dir: Path, rank0_env: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ModelLoadError, match="WORLD_SIZE is 4 but tensor_parallel_size is 2"):
        LLM(str(tiny_llama_dir), tensor_parallel_size=2, **TP_ENGINE)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ModelLoadError, match="pagedserve worker"):
        LLM(str(tiny_llama_dir), tensor_parallel_size=2, **TP_ENGINE)
    monkeypatch.delenv("MASTER_PORT")
    with pytest.raises(ModelLoadError, match="MASTER_PORT not set"):
        LLM(str(tiny_llama_dir), tensor_parallel_size=2, **TP_ENGINE)


@pytest.mark.parametrize(
    ("env", "args", "message"),
    [
        ({}, [], "needs MASTER_ADDR"),
        (_dist_env(1, 0), [], "RANK must be in [1, WORLD_SIZE)"),
        (_dist_env(1, 1), ["--tensor-parallel-size", "4"], "differs from WORLD_SIZE 2"),
    ],
)
def test_worker_command_rejects_a_bad_environment(
    env: dict[str, str],
    args: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for key in _dist_env(0, 0):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert cli_main(["worker", *args]) == 2
    assert message in capsys.readouterr().err


def test_silent_remote_worker_is_declared_dead(
    tiny_llama_dir: Path, rank0_env: int, start_worker: StartWorker
) -> None:
    """Rank 0 cannot see a remote worker's process: a hung one (SIGSTOP here) is caught by its
    missing heartbeats, even while the engine is idle."""
    worker = start_worker(rank0_env)
    timeout_s = 2.0
    with LLM(str(tiny_llama_dir), tensor_parallel_size=2, worker_heartbeat_interval_s=0.2,
             worker_heartbeat_timeout_s=timeout_s, **TP_ENGINE) as split:
        assert split.generate(["Hello"], SamplingParams(max_tokens=2))[0].token_ids
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            leader = split.engine.runner.leader
            deadline = time.monotonic() + 5 * timeout_s
            while leader.dead_reason is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert leader.dead_reason == (
                f"tensor-parallel rank 1 sent no heartbeat for {timeout_s:.0f} s"
            )
            with pytest.raises(EngineDeadError, match="no heartbeat"):
                split.generate(["Hello"], SamplingParams(max_tokens=2))
        finally:
            os.kill(worker.pid, signal.SIGKILL)
