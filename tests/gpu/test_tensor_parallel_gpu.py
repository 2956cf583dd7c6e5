"""Tensor parallelism on 2 GPUs (NCCL): fp32 greedy parity of TP=2 with TP=1, a killed worker
failing the engine fast, and TP=2 against TP=1 throughput and batch-1 decode latency on a
random-weight Llama-3-8B. Each stage runs ``tp_bench.py`` in a fresh process; the numbers are
printed (run with ``-s``) and written to ``$PAGEDSERVE_TP_RESULTS`` when set.

NVLink multicast stays off in every process started here: NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from tests.backend.engine.reference import ReferenceOutput, compare_greedy

pytestmark = [
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
    pytest.mark.timeout(1800),
]

SCRIPT = Path(__file__).resolve().parent / "tp_bench.py"
ROOT = Path(__file__).resolve().parents[2]
NO_MULTICAST = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
STAGE_TIMEOUT_S = 600
# With the communicators aborted, a dead worker fails the stream within a few steps.
KILL_NOTICED_S = 30.0


@pytest.fixture(scope="module")
def tokenizer_dir(request: pytest.FixtureRequest) -> Path:
    """Tokenizer files for the dummy models: ``$PAGEDSERVE_GPU_TOKENIZER`` where given (a
    device machine without the default model's package), else the default model's directory."""
    given = os.environ.get("PAGEDSERVE_GPU_TOKENIZER")
    return Path(given) if given else request.getfixturevalue("default_model_dir")


def _run(stage: str, tp: int, tokenizer: Path, tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / f"{stage}-tp{tp}.json"
    env = {**os.environ, **NO_MULTICAST, "PYTHONPATH": str(ROOT)}
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--stage", stage, "--tp", str(tp),
         "--tokenizer", str(tokenizer), "--out", str(out)],
        env=env, timeout=STAGE_TIMEOUT_S, capture_output=True, text=True,
    )
    assert proc.returncode == 0, f"{stage} tp={tp} failed:\n{proc.stdout}\n{proc.stderr[-8000:]}"
    leftover = {p.pid for p in psutil.Process().children(recursive=True)} - before
    assert not leftover, f"{stage} tp={tp} left processes behind: {leftover}"
    return json.loads(out.read_text())


def _record(name: str, value: Any) -> None:
    target = os.environ.get("PAGEDSERVE_TP_RESULTS")
    if target:
        path = Path(target)
        results = json.loads(path.read_text()) if path.exists() else {}
        results[name] = value
        path.write_text(json.dumps(results, indent=2))


def test_tp2_greedy_tokens_match_tp1_in_fp32(tokenizer_dir: Path, tmp_path: Path) -> None:
    single = _run("parity", 1, tokenizer_dir, tmp_path)
    split = _run("parity", 2, tokenizer_dir, tmp_path)
    refs = [ReferenceOutput(t, g) for t, g in zip(single["token_ids"], single["top2_gaps"])]
    ties = compare_greedy(split["token_ids"], refs)
    print(f"\nparity fp32 Llama-3.2-1B (dummy): TP=2 tokens equal TP=1 for 16 requests "
          f"(near-ties met: {ties})")
    _record("parity", {"requests": len(refs), "near_ties": ties, "device": split["device"]})


def test_killed_worker_fails_the_engine_fast(tokenizer_dir: Path, tmp_path: Path) -> None:
    result = _run("kill", 2, tokenizer_dir, tmp_path)
    print(f"\nkill: stream failed {result['seconds_to_fail']:.2f} s after SIGKILL: "
          f"{result['error']}")
    _record("kill", result)
    assert result["error"] is not None and "rank 1" in result["error"]
    assert result["seconds_to_fail"] < KILL_NOTICED_S
    assert not psutil.pid_exists(result["killed_pid"]) or (
        psutil.Process(result["killed_pid"]).status() == psutil.STATUS_ZOMBIE
    )


def test_tp2_throughput_and_decode_latency_beside_tp1(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    single = _run("bench", 1, tokenizer_dir, tmp_path)
    split = _run("bench", 2, tokenizer_dir, tmp_path)
    print(f"\nLlama-3-8B (dummy, bf16) on {split['device']}: "
          "256 requests x 512 prompt / 256 output tokens, ignore_eos")
    print(f"{'':<6}{'output tok/s':>14}{'seconds':>10}{'decode ms (bs 1)':>20}")
    for r in (single, split):
        print(f"TP={r['tp']:<3}{r['output_tokens_per_s']:>14.1f}{r['seconds']:>10.2f}"
              f"{r['decode_ms_median']:>20.2f}")
    speedup = split["output_tokens_per_s"] / single["output_tokens_per_s"]
    latency = single["decode_ms_median"] / split["decode_ms_median"]
    print(f"TP=2 / TP=1: throughput {speedup:.2f}x, batch-1 decode {latency:.2f}x faster")
    _record("bench", {"tp1": single, "tp2": split})
    assert split["output_tokens"] == single["output_tokens"] == 256 * 256
