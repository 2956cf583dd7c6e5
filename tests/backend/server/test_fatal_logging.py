"""A fatal condition is logged once, at error level, with its cause: here the engine process
dying under a running server (its death was once noticed only by health turning NOT_SERVING)."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytest

from tests.backend.server.harness import TINY_ENGINE, running_server

EXIT_WITHIN_S = 30.0


def test_a_killed_engine_process_is_logged_once_with_its_cause(
    tiny_llama_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with running_server(
        tiny_llama_dir, engine_process=True, server_options={"engine_check_interval_s": 0.05},
        **TINY_ENGINE,
    ) as server:
        engine = server.state.engine
        assert engine is not None and engine.engine_pid is not None
        with caplog.at_level(logging.INFO, logger="pagedserve"):
            os.kill(engine.engine_pid, signal.SIGKILL)
            assert server.wait_exit(EXIT_WITHIN_S) == 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    message = errors[0].getMessage()
    assert "the engine has stopped" in message
    assert "exited unexpectedly (exit code -9)" in message
