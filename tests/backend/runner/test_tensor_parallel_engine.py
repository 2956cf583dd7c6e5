"""Tensor parallelism through the offline engine on CPU: 2 ranks over gloo give the greedy
tokens of the unsplit model (near-tie rule), a dead worker stops the engine with a clear error
instead of a hang, and no worker process outlives its engine."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.backend.errors import EngineDeadError, ModelLoadError
from pagedserve.backend.runner.distributed import TensorParallelGroup
from tests.backend.engine.reference import ReferenceOutput, compare_greedy
from tests.backend.runner.tp_harness import (
    TP_ENGINE,
    assert_gone,
    generate_with_gaps,
    mixed_params,
    mixed_prompts,
    worker_children,
)

pytestmark = pytest.mark.timeout(240)

# A dead worker must stop the engine well inside this (no collective timeout is involved).
DEATH_NOTICED_S = 10.0


@pytest.fixture(autouse=True)
def no_workers_left() -> Iterator[None]:
    yield
    assert_gone([p.pid for p in worker_children()])


def _tp1_vs_tp2(
    model_dir: Path, want: list[ReferenceOutput] | None = None, **extra: Any
) -> LLM:
    """Runs the mixed workload at TP=2 and compares it with TP=1 (``want``, else run here);
    returns the TP=2 LLM (already shut down) for shape checks."""
    prompts, params = mixed_prompts(), mixed_params()
    if want is None:
        with LLM(str(model_dir), **TP_ENGINE, **extra) as single:
            want = generate_with_gaps(single, prompts, params)
    with LLM(str(model_dir), tensor_parallel_size=2, **TP_ENGINE, **extra) as split:
        assert len(worker_children()) == 1
        got = generate_with_gaps(split, prompts, params)
    assert sum(len(g.token_ids) for g in got) > 100, "the workload barely generated"
    compare_greedy([g.token_ids for g in got], want)
    # Logprobs come from the gathered logits: the same numbers up to summation order.
    for g, w in zip(got, want):
        for a, b in zip(g.top2_gaps, w.top2_gaps):
            assert abs(a - b) < 1e-3
    return split


def test_llama_tp2_matches_tp1(
    tiny_llama_dir: Path, llama_tp1_reference: list[ReferenceOutput]
) -> None:
    split = _tp1_vs_tp2(tiny_llama_dir, llama_tp1_reference)
    runner = split.engine.runner
    # 4 query heads over 2 KV heads: each rank holds 2 query heads and 1 KV head.
    assert runner.model.num_kv_heads == 1
    assert runner.model.model.embed_tokens.weight.shape[0] == 49152 // 2
    assert runner.model.lm_head.tied


def test_overlapped_scheduling_tp2_matches_tp1(
    tiny_llama_dir: Path, llama_tp1_reference: list[ReferenceOutput], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With overlapped scheduling a step's decode inputs are still being sampled on rank 0
    when the step goes out: rank 0 broadcasts them to the workers in the step itself."""
    broadcasts: list[int] = []
    original = TensorParallelGroup.broadcast_from_rank0

    def counted(self: TensorParallelGroup, tensor: torch.Tensor) -> None:
        broadcasts.append(tensor.numel())
        original(self, tensor)

    monkeypatch.setattr(TensorParallelGroup, "broadcast_from_rank0", counted)
    split = _tp1_vs_tp2(tiny_llama_dir, llama_tp1_reference, overlap_scheduling=True)
    assert split.engine.overlap
    assert len(broadcasts) > 20 and max(broadcasts) > 1, broadcasts


def test_qwen2_tp2_matches_tp1(tiny_qwen2_dir: Path) -> None:
    """q/k/v biases, an untied split LM head, a sharded checkpoint."""
    split = _tp1_vs_tp2(tiny_qwen2_dir)
    assert not split.engine.runner.model.lm_head.tied


def test_replicated_kv_head_and_padded_vocab_tp2_matches_tp1(tiny_llama_dir: Path) -> None:
    """One KV head for two ranks (replicated), a vocabulary that does not split evenly (the last
    rank's rows are padding), and dummy weights (drawn full-size, so both splits agree)."""
    overrides = {"num_key_value_heads": 1, "vocab_size": 49157}
    split = _tp1_vs_tp2(tiny_llama_dir, load_format="dummy", hf_overrides=overrides, seed=7)
    runner = split.engine.runner
    assert runner.model.num_kv_heads == 1
    assert runner.model.model.embed_tokens.weight.shape[0] == 24579  # ceil(49157 / 2)
    assert split.engine.vocab_size == 49157


def test_killed_worker_fails_the_engine_clearly(tiny_llama_dir: Path) -> None:
    with LLM(str(tiny_llama_dir), tensor_parallel_size=2, **TP_ENGINE) as llm:
        (pid,) = llm.engine.runner.leader.worker_pids
        stream = llm.stream("Keep going", SamplingParams(max_tokens=200, ignore_eos=True))
        next(stream)
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match=rf"rank 1 \(pid {pid}\) exited with code -9"):
            for _ in stream:
                pass
        assert time.monotonic() - start < DEATH_NOTICED_S
        with pytest.raises(EngineDeadError):
            llm.generate(["Anyone there?"], SamplingParams(max_tokens=2))


def test_split_that_does_not_divide_is_a_load_error(tiny_llama_dir: Path) -> None:
    """3 ranks for 4 heads: every rank fails to build its shard; rank 0 reports it and stops
    the workers it started."""
    with pytest.raises(ModelLoadError, match="not divisible"):
        LLM(str(tiny_llama_dir), tensor_parallel_size=3, **TP_ENGINE)
