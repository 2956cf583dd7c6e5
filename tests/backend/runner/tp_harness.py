"""Shared pieces of the tensor-parallel tests: the mixed workload, the TP=1 reference with its
top-two logit gaps (for the near-tie rule), and the check that no worker process is left."""

from __future__ import annotations

import random
import time
from typing import Any

import psutil

from pagedserve import LLM, SamplingParams
from tests.backend.engine.reference import ReferenceOutput

# A worker's command line runs this module (local workers) or the `worker` subcommand.
WORKER_MODULE = "pagedserve.backend.runner.worker"
# Small enough for 2 cores; tight enough that prefill chunks share steps with decodes and the
# KV blocks run out (the mixed workload below preempts a request once).
TP_ENGINE: dict[str, Any] = {
    "device": "cpu",
    "dtype": "float32",
    "block_size": 16,
    "num_blocks": 24,
    "max_num_seqs": 8,
    "max_num_batched_tokens": 64,
}
WORKER_EXIT_TIMEOUT_S = 15.0


def mixed_prompts(vocab_limit: int = 49152, seed: int = 0) -> list[list[int]]:
    """8 prompts of mixed lengths (a single token to several blocks); two share a prefix."""
    rng = random.Random(seed)
    lengths = [1, 5, 17, 33, 64, 100, 150, 90]
    prompts = [[rng.randrange(3, vocab_limit) for _ in range(n)] for n in lengths]
    prompts[7] = prompts[6][:80] + prompts[7][:10]
    return prompts


def mixed_params() -> list[SamplingParams]:
    """Greedy with mixed lengths; two-token logprobs give the reference's top-two gap."""
    return [SamplingParams(max_tokens=n, temperature=0.0, logprobs=2) for n in
            (24, 8, 32, 16, 40, 12, 20, 28)]


def generate_with_gaps(
    llm: LLM, prompts: list[list[int]], params: list[SamplingParams]
) -> list[ReferenceOutput]:
    """Greedy tokens and, per position, the gap between the top two logits."""
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    refs = []
    for out in outputs:
        assert out.logprobs is not None
        gaps = [lp.top[0][1] - lp.top[1][1] for lp in out.logprobs]
        refs.append(ReferenceOutput(list(out.token_ids), gaps))
    return refs


def worker_children() -> list[psutil.Process]:
    """Live tensor-parallel workers among this process's descendants."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = proc.cmdline()
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if WORKER_MODULE in cmdline or "worker" in cmdline:
            found.append(proc)
    return found


def assert_gone(pids: list[int], timeout_s: float = WORKER_EXIT_TIMEOUT_S) -> None:
    """Every pid has exited (zombies awaiting their parent count as exited)."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"worker processes {alive} still running after {timeout_s} s")
        time.sleep(0.05)
