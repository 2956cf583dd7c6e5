"""How many source files one Generate call runs through, measured: a profiler hook on every
thread records the repository files whose code runs between sending a streaming Generate and
its last message, on a real server over loopback (engine on a thread, metrics on, tracing
off: the defaults on the CPU). ARCHITECTURE.md lists the files and the CUDA-only ones."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from pagedserve import SamplingParams
from pagedserve.backend.config import EngineConfig, ServerConfig, TelemetryConfig
from pagedserve.backend.server.server import BackgroundServer
from pagedserve.clients.client import GenerationClient

ROOT = Path(__file__).resolve().parents[2]
# Outside the count: the Triton kernels (leaves, like the libraries below them) and the
# client library (the caller's side, in the test's own thread).
NOT_COUNTED = ("kernels/", "clients/")
# Files on the path of a CUDA step in place of the CPU's (decode graphs, Triton attention).
CUDA_ONLY = ("backend/runner/graphs.py", "backend/runner/triton_attention.py")
MAX_FILES = 15


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
        host="127.0.0.1", port=0, telemetry=TelemetryConfig(metrics_port=0), engine_process=False
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
        if path.is_relative_to(ROOT) and "tests" not in path.relative_to(ROOT).parts:
            rel = path.relative_to(ROOT).as_posix()
            if not rel.startswith(NOT_COUNTED):
                ours.add(rel)
    return sorted(ours)


def test_a_generate_call_runs_through_at_most_fifteen_files(tiny_llama_dir: Path) -> None:
    files = path_files(tiny_llama_dir)
    print("\n".join(files))
    on_cuda = [f for f in files if f != "backend/runner/attention.py" or True] + list(CUDA_ONLY)
    assert "backend/engine/core.py" in files and "backend/server/generation_service.py" in files
    assert len(set(on_cuda)) <= MAX_FILES, f"{len(set(on_cuda))} files on CUDA: {files}"
    _ = SamplingParams
