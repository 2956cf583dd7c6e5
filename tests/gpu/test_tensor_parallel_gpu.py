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


def _run(stage: str, tp: int, tokenizer: Path, tmp_path: Path, overlap: str | None = None) -> dict[str, Any]:
    """One ``tp_bench.py`` stage in a fresh process; ``overlap`` "on"/"off" sets overlapped
    scheduling (None: the engine's default)."""
    name = f"{stage}-tp{tp}" + (f"-overlap-{overlap}" if overlap else "")
    out = tmp_path / f"{name}.json"
    env = {**os.environ, **NO_MULTICAST, "PYTHONPATH": str(ROOT)}
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    command = [sys.executable, str(SCRIPT), "--stage", stage, "--tp", str(tp),
               "--tokenizer", str(tokenizer), "--out", str(out)]
    if overlap:
        command += ["--overlap", overlap]
    proc = subprocess.run(command, env=env, timeout=STAGE_TIMEOUT_S, capture_output=True, text=True)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr[-8000:]}"
    leftover = {p.pid for p in psutil.Process().children(recursive=True)} - before
    assert not leftover, f"{name} left processes behind: {leftover}"
    return json.loads(out.read_text())


def _record(name: str, value: Any) -> None:
    target = os.environ.get("PAGEDSERVE_TP_RESULTS")
    if target:
        path = Path(target)
        results = json.loads(path.read_text()) if path.exists() else {}
        results[name] = value
        path.write_text(json.dumps(results, indent=2))


# Overlapped scheduling with tensor parallelism is opt-in: both settings are checked.
OVERLAP = ["off", "on"]


@pytest.fixture(scope="module")
def tp1_parity(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run("parity", 1, tokenizer_dir, tmp_path_factory.mktemp("tp1"))


@pytest.mark.parametrize("overlap", OVERLAP)
def test_tp2_greedy_tokens_match_tp1_in_fp32(
    overlap: str, tp1_parity: dict[str, Any], tokenizer_dir: Path, tmp_path: Path
) -> None:
    single = tp1_parity
    split = _run("parity", 2, tokenizer_dir, tmp_path, overlap)
    refs = [ReferenceOutput(t, g) for t, g in zip(single["token_ids"], single["top2_gaps"])]
    ties = compare_greedy(split["token_ids"], refs)
    print(f"\nparity fp32 Llama-3.2-1B (dummy), overlap {overlap}: TP=2 tokens equal TP=1 for "
          f"16 requests (near-ties met: {ties})")
    _record(f"parity-overlap-{overlap}", {"requests": len(refs), "near_ties": ties, "device": split["device"]})


@pytest.mark.parametrize("overlap", OVERLAP)
def test_killed_worker_fails_the_engine_fast(overlap: str, tokenizer_dir: Path, tmp_path: Path) -> None:
    result = _run("kill", 2, tokenizer_dir, tmp_path, overlap)
    print(f"\nkill, overlap {overlap}: stream failed {result['seconds_to_fail']:.2f} s after "
          f"SIGKILL: {result['error']}")
    _record(f"kill-overlap-{overlap}", result)
    assert result["error"] is not None and "rank 1" in result["error"]
    assert result["seconds_to_fail"] < KILL_NOTICED_S
    assert not psutil.pid_exists(result["killed_pid"]) or (
        psutil.Process(result["killed_pid"]).status() == psutil.STATUS_ZOMBIE
    )


def test_tp2_throughput_and_decode_latency_beside_tp1(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    runs = [_run("bench", 1, tokenizer_dir, tmp_path)]
    runs += [_run("bench", 2, tokenizer_dir, tmp_path, overlap) for overlap in OVERLAP]
    print(f"\nLlama-3-8B (dummy, bf16) on {runs[-1]['device']}: "
          "256 requests x 512 prompt / 256 output tokens, ignore_eos")
    print(f"{'':<6}{'overlap':>8}{'output tok/s':>14}{'seconds':>10}{'decode ms (bs 1)':>20}")
    for r in runs:
        print(f"TP={r['tp']:<3}{'on' if r['overlap'] else 'off':>8}{r['output_tokens_per_s']:>14.1f}"
              f"{r['seconds']:>10.2f}{r['decode_ms_median']:>20.2f}")
    single = runs[0]
    for r in runs[1:]:
        print(f"TP=2 (overlap {'on' if r['overlap'] else 'off'}) / TP=1: throughput "
              f"{r['output_tokens_per_s'] / single['output_tokens_per_s']:.2f}x, batch-1 decode "
              f"{single['decode_ms_median'] / r['decode_ms_median']:.2f}x faster")
    _record("bench", {"tp1": runs[0], "tp2_overlap_off": runs[1], "tp2_overlap_on": runs[2]})
    assert all(r["output_tokens"] == 256 * 256 for r in runs)
