"""Which source files one Generate call runs through, measured: a profiler hook on every
thread records the repository files whose code runs between sending a streaming Generate and
its last message, on a real server over loopback (engine on a thread, metrics on, tracing
off: the CPU defaults). ARCHITECTURE.md lists the same files."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from pagedserve.backend.config import EngineConfig, ServerConfig, TelemetryConfig
from pagedserve.backend.server.server import BackgroundServer
from pagedserve.clients.client import GenerationClient

ROOT = Path(__file__).resolve().parents[2]
# Outside the count: the Triton kernels (leaves, like the libraries below them) and the
# client library (the caller's side, in the test's own thread).
NOT_COUNTED = ("kernels/", "clients/")
# The path, as ARCHITECTURE.md lists it. A module that joins the path (or leaves it) changes
# this list and that page together.
EXPECTED_ON_CPU = {
    # the server's edge
    "backend/server/generation_service.py",  # the native front: proto in, deltas out
    "backend/server/translate.py",  # request fields -> SamplingParams, for every front
    "backend/server/choices.py",  # the prompt's ids and its n choices, for every front
    "backend/server/wire.py",  # tolerant decoding of the request bytes
    "backend/server/state.py",  # the serving phase every service checks
    "backend/telemetry/server_telemetry.py",  # the RPC's span (a no-op one here)
    "backend/telemetry/tracing.py",
    "backend/telemetry/observer.py",  # the engine's listeners, queued to telemetry's thread
    "backend/telemetry/metrics.py",
    # the engine
    "backend/engine/client.py",
    "backend/sampling_params.py",
    "backend/engine/request.py",
    "backend/engine/core.py",
    "backend/engine/scheduler.py",
    "backend/engine/block_manager.py",
    "backend/engine/output.py",
    # the runner
    "backend/runner/model_runner.py",
    "backend/runner/batch.py",
    "backend/runner/sampler.py",
    "backend/runner/attention.py",
    # the model
    "backend/models/llama.py",
    "backend/models/layers.py",
    "backend/quantization/unquantized.py",
}
# What a CUDA server adds (measured on the device, not here): the engine process's socket
# encoding and the decode CUDA graphs.
CUDA_ONLY = {"backend/engine/messages.py", "backend/runner/graphs.py"}


class _Recorder:
    def __init__(self) -> None:
        self.on = False
        self.files: set[str] = set()

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if self.on and event == "call":
            self.files.add(frame.f_code.co_filename)


def path_files(model_dir: Path) -> list[str]:
    recorder = _Recorder()
    threading.setprofile(recorder)  # every thread the server starts from here on
    config = ServerConfig(
        host="127.0.0.1", port=0, http_port=None, telemetry=TelemetryConfig(metrics_port=0),
        engine_process=False,
    )
    engine = EngineConfig.from_kwargs(model=str(model_dir), device="cpu", num_blocks=64)
    server = BackgroundServer(config, engine)
    try:
        address = server.start()
        server.wait_ready()
        with GenerationClient(address) as client:
            sys.setprofile(recorder)
            recorder.on = True
            for _ in client.generate_text(prompt="Count the files", max_tokens=4, temperature=0.0):
                pass
            recorder.on = False
            sys.setprofile(None)
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
        server.stop()
    ours = set()
    for name in recorder.files:
        path = Path(name).resolve()
        if not path.is_relative_to(ROOT):
            continue  # libraries, and code compiled from strings (dataclass methods)
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(("backend/", "protos/", "kernels/", "clients/")):
            if not rel.startswith(NOT_COUNTED):
                ours.add(rel)
    return sorted(ours)


def test_a_generate_call_runs_through_the_files_architecture_md_lists(tiny_llama_dir: Path) -> None:
    files = set(path_files(tiny_llama_dir))
    assert files == EXPECTED_ON_CPU, (
        f"joined the path: {sorted(files - EXPECTED_ON_CPU)}; "
        f"left it: {sorted(EXPECTED_ON_CPU - files)}"
    )
    assert len(files | CUDA_ONLY) == 25
