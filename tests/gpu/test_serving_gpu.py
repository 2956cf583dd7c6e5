"""`pagedserve serve` on CUDA with its defaults: the engine loop runs in a process of its own,
only that process touches the GPU, streamed greedy tokens equal the offline engine's, and a
SIGTERM drains and leaves no process behind.

The model is a 2-layer cut of the Llama-3.2-1B config with dummy weights in fp32 (reproducible
from the seed), so both engines hold the same weights without a checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.clients.client import GenerationClient
from tests.backend.runner.tp_harness import assert_gone

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.timeout(600),
]

CONFIG = Path(__file__).resolve().parent / "configs" / "llama-3.2-1b" / "config.json"
LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
START_TIMEOUT_S = 300.0
ENGINE_FLAGS = ["--load-format", "dummy", "--dtype", "float32", "--max-model-len", "1024"]
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    given = os.environ.get("PAGEDSERVE_GPU_TOKENIZER")
    tokenizer = Path(given) if given else request.getfixturevalue("default_model_dir")
    out = tmp_path_factory.mktemp("llama-2-layers")
    config = json.loads(CONFIG.read_text())
    config["num_hidden_layers"] = 2
    (out / "config.json").write_text(json.dumps(config))
    for f in tokenizer.iterdir():
        if f.is_file() and not f.name.startswith(("config", "model")) and f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture
def server(model_dir: Path, tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "pagedserve.backend.cli", "serve", "--model", str(model_dir),
             "--host", "127.0.0.1", "--port", "0", "--http-port", "0", "--metrics-port", "0", *ENGINE_FLAGS],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (match := LISTENING.search(log.read_text(errors="replace"))):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield process, f"127.0.0.1:{match.group(1)}"
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)


def _gpu_pids() -> set[int]:
    """Processes holding a CUDA context, as the driver reports them."""
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
        capture_output=True, text=True, check=True,
    ).stdout
    return {int(line) for line in out.split()}


def test_default_server_runs_the_engine_in_its_own_process(
    server: tuple[subprocess.Popen[bytes], str], model_dir: Path
) -> None:
    process, address = server
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    with GenerationClient(address) as client:
        client.wait_until_serving(START_TIMEOUT_S)
        (engine,) = psutil.Process(process.pid).children()
        assert "pagedserve.backend.engine.engine_process" in " ".join(engine.cmdline())
        # One request at a time, as the offline engine runs them below: the same batches.
        served = [
            [t for r in client.generate(p, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
             for t in r.token_ids]
            for p in PROMPTS
        ]
        holders = _gpu_pids()
        assert engine.pid in holders and process.pid not in holders, holders
        process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0
    assert_gone([engine.pid])

    llm = LLM(str(model_dir), load_format="dummy", dtype="float32", max_model_len=1024)
    offline = [llm.generate([p], params)[0].token_ids for p in PROMPTS]
    assert served == offline
