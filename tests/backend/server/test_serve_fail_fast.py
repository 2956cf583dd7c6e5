"""`pagedserve serve` ends on a fatal start-up error: a non-zero exit within a bounded time and a
last line that names the cause, not a traceback and not a server listening forever."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.backend.server.harness import TINY_ENGINE
from tests.conftest import TinyModelFactory

# The bound for a bad start, on a busy two-core machine (torch's import alone is ~5 s).
EXIT_WITHIN_S = 30.0
# Nine attention heads (and three KV heads) split over no even number of ranks.
NINE_HEADS: dict[str, Any] = {
    "hidden_size": 72, "num_attention_heads": 9, "num_key_value_heads": 3,
}


def _serve(*flags: str) -> subprocess.CompletedProcess[str]:
    engine = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_ENGINE.items()]
    return subprocess.run(
        [sys.executable, "-m", "pagedserve.backend.cli", "serve", "--host", "127.0.0.1",
         "--metrics-host", "127.0.0.1", "--metrics-port", "0", "--http-port", "0",
         "--device", "cpu", *engine, *flags],
        capture_output=True, text=True, timeout=EXIT_WITHIN_S,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
    )


def _last_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[-1] if lines else ""


def _no_traceback(done: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in done.stderr + done.stdout, done.stderr


def test_a_missing_model_exits_with_one_line(tmp_path: Path) -> None:
    done = _serve("--port", "0", "--model", str(tmp_path / "nowhere"))
    assert done.returncode == 1, done.stderr
    last = _last_line(done)
    assert "the model failed to load: ModelLoadError" in last and "nowhere" in last, last
    _no_traceback(done)


def test_an_unsupported_architecture_exits_with_one_line(tmp_path: Path) -> None:
    model = tmp_path / "gpt2"
    model.mkdir()
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
    (model / "config.json").write_text(json.dumps(config))
    done = _serve("--port", "0", "--model", str(model))
    assert done.returncode == 1, done.stderr
    last = _last_line(done)
    assert "the model failed to load: ModelLoadError" in last and "gpt2" in last, last
    _no_traceback(done)


def test_heads_that_do_not_split_over_the_ranks_exit_with_one_line(
    tiny_model_factory: TinyModelFactory, tiny_llama_settings: dict[str, Any]
) -> None:
    model = tiny_model_factory("tiny-nine-heads", {**tiny_llama_settings, **NINE_HEADS})
    done = _serve("--port", "0", "--model", str(model), "--tensor-parallel-size", "2")
    assert done.returncode == 1, done.stderr
    last = _last_line(done)
    assert "the model failed to load" in last and "not divisible" in last, last
    _no_traceback(done)


def test_a_busy_port_exits_with_one_line(tiny_llama_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = _serve("--port", str(port), "--model", str(tiny_llama_dir))
    assert done.returncode == 1, done.stderr
    last = _last_line(done)
    assert last.startswith("pagedserve serve:") and str(port) in last, last
    _no_traceback(done)


def test_a_busy_metrics_port_exits_with_one_line(tiny_llama_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = _serve("--port", "0", "--metrics-port", str(port), "--model", str(tiny_llama_dir))
    assert done.returncode == 1, done.stderr
    last = _last_line(done)
    assert last.startswith("pagedserve serve: cannot serve metrics on") and str(port) in last, last
    _no_traceback(done)


def test_a_busy_http_port_exits_with_one_line(tiny_llama_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = _serve("--port", "0", "--http-port", str(port), "--model", str(tiny_llama_dir))
    assert done.returncode == 1, done.stderr
    last = _last_line(done)
    assert last.startswith("pagedserve serve: cannot serve the HTTP API on"), last
    assert str(port) in last, last
    _no_traceback(done)


def test_the_traceback_is_there_at_debug_level(tmp_path: Path) -> None:
    done = _serve("--port", "0", "--model", str(tmp_path / "nowhere"), "--log-level", "DEBUG")
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "ModelLoadError" in done.stderr


@pytest.mark.parametrize("flag", ["--no-exit-on-load-error"])
def test_the_flag_keeps_a_failed_server_listening(tmp_path: Path, flag: str) -> None:
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run(
            [sys.executable, "-m", "pagedserve.backend.cli", "serve", "--host", "127.0.0.1",
             "--port", "0", "--metrics-port", "0", "--http-port", "0", "--device", "cpu",
             "--model",
             str(tmp_path / "nowhere"), flag],
            capture_output=True, text=True, timeout=15,
        )
