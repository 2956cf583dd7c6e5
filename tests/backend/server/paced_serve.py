"""The ``pagedserve`` command with every engine step stretched by a fixed pause.

Drain tests need streams that are surely still running when a signal lands, however fast the
machine; a tiny model on CPU finishes hundreds of tokens in well under a second. Each step
sleeps ``STEP_DELAY_S`` after it ran (what ``SlowSteps`` does in process). Everything else is
the real command: argument parsing, loading, signals, drain and exit code. Sleeping also keeps
several replicas from fighting over a small machine's cores.

    python -m tests.backend.server.paced_serve STEP_DELAY_S serve --model DIR ...
"""

from __future__ import annotations

import sys
import time
from typing import Any
from collections.abc import Sequence

from pagedserve.backend.cli import main as pagedserve_main
from pagedserve.backend.config import EngineConfig
from pagedserve.backend.engine.client import EngineClient
from pagedserve.backend.engine.messages import StepInfo


def pace_engine_steps(delay_s: float) -> None:
    """Every engine built from now on sleeps ``delay_s`` after each step, on its loop thread."""
    build = EngineClient.from_config

    def paced(config: EngineConfig, stream_interval: int = 1, **options: Any) -> EngineClient:
        engine = build(config, stream_interval, **options)

        def pause(_: StepInfo) -> None:
            time.sleep(delay_s)

        engine.add_step_listener(pause)
        return engine

    EngineClient.from_config = staticmethod(paced)  # type: ignore[method-assign]


def main(argv: Sequence[str]) -> int:
    if len(argv) < 2:
        raise SystemExit("usage: paced_serve STEP_DELAY_S serve [pagedserve serve flags]")
    pace_engine_steps(float(argv[0]))
    return pagedserve_main(list(argv[1:]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
