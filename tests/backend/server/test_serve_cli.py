"""`pagedserve serve` as a process: it listens, serves, and drains to exit 0 on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pagedserve.clients.client import GenerationClient
from tests.backend.runner.tp_harness import assert_gone
from tests.backend.server.harness import TINY_ENGINE

LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
START_TIMEOUT_S = 120.0


def _engine_flags() -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in TINY_ENGINE.items()]


def _children(pid: int) -> set[int]:
    children: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        children |= {int(c) for c in (task / "children").read_text().split()}
    return children


@pytest.fixture(params=["--no-engine-process", "--engine-process"])
def serve_process(
    tiny_llama_dir: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[subprocess.Popen[str], str, bool]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "pagedserve.backend.cli", "serve", "--model", str(tiny_llama_dir),
         "--host", "127.0.0.1", "--port", "0", "--http-port", "0", "--metrics-port", "0", "--drain-timeout", "10",
         request.param, *_engine_flags()],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stderr is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    address = None
    for line in process.stderr:
        match = LISTENING.search(line)
        if match:
            address = f"127.0.0.1:{match.group(1)}"
            break
        assert time.monotonic() < deadline, "serve did not start listening"
    assert address is not None, "serve exited before listening"
    try:
        yield process, address, request.param == "--engine-process"
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)


def test_serve_answers_then_drains_on_sigterm(
    serve_process: tuple[subprocess.Popen[str], str, bool],
) -> None:
    process, address, engine_process = serve_process
    with GenerationClient(address) as client:
        client.wait_until_serving(START_TIMEOUT_S)
        children = _children(process.pid)
        assert len(children) == (1 if engine_process else 0), children
        info = client.model_info()
        assert info.model_name == "tiny-llama"
        stream = iter(client.generate("Hello", max_tokens=24, ignore_eos=True, temperature=0.0))
        first = next(stream)
        process.send_signal(signal.SIGTERM)
        # The in-flight request still completes during the drain.
        rest = list(stream)
    assert sum(len(r.token_ids) for r in [first, *rest]) == 24
    assert process.wait(60) == 0
    assert_gone(sorted(children))
