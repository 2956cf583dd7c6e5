"""The CPU serving path of paged attention against the torch reference, on random ragged batches."""

from __future__ import annotations

import random

import pytest
import torch

from pagedserve.kernels import paged_attention as paged_attention_module
from pagedserve.kernels.paged_attention import paged_attention_cpu
from tests.kernels.paged_batch import Batch, make_batch, reference

CPU = torch.device("cpu")
# Max abs error vs the reference (inputs ~N(0,1), outputs are convex mixes of V rows): the two
# differ only in how SDPA blocks and orders its sums.
TOLERANCE = {torch.float32: 2e-6, torch.float16: 2e-3}
HEAD_CONFIGS = [(4, 4), (9, 3), (8, 1)]  # GQA ratios 1, 3, 8


def run_cpu(batch: Batch, scale: float) -> torch.Tensor:
    return paged_attention_cpu(
        batch.q, batch.kv_cache, batch.block_tables, batch.query_lens, batch.seq_lens_list, scale
    )


def assert_close(out: torch.Tensor, batch: Batch, scale: float) -> None:
    assert out.shape == batch.q.shape and out.dtype == batch.q.dtype
    rows = batch.num_real_tokens
    ref = reference(batch, scale)
    err = (out[:rows].float() - ref[:rows].float()).abs().max().item()
    assert err <= TOLERANCE[out.dtype], f"max abs error {err} > {TOLERANCE[out.dtype]}"


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("num_heads,num_kv_heads", HEAD_CONFIGS)
def test_random_ragged_batches_match_reference(
    num_heads: int, num_kv_heads: int, seed: int
) -> None:
    # Fresh prompts, chunks over a cached prefix, decodes and idle sequences, some sharing
    # (query, context) lengths so they batch, in shuffled order so groups are not back to back.
    rng = random.Random(seed)
    shapes = [(rng.choice([2, 5, 16]), rng.choice([0, 0, 7, 30])) for _ in range(rng.randint(1, 6))]
    shapes += [(1, rng.randint(0, 70)) for _ in range(rng.randint(0, 6))]
    shapes += [(0, rng.randint(1, 20)) for _ in range(rng.randint(0, 2))]
    shapes += shapes[: rng.randint(0, len(shapes))]  # repeats: groups of several sequences
    rng.shuffle(shapes)
    query_lens = [n for n, _ in shapes]
    context_lens = [c for _, c in shapes]
    if sum(query_lens) == 0:
        query_lens[0] = 1
    batch = make_batch(
        query_lens, context_lens, num_heads, num_kv_heads, 64, torch.float32, CPU,
        block_size=rng.choice([4, 16]), padding_tokens=rng.choice([0, 3]), seed=seed,
    )
    assert_close(run_cpu(batch, 0.125), batch, 0.125)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("context_lens", [[40] * 5, [3, 17, 16, 40, 1]])
def test_pure_decode_equal_and_ragged_contexts(context_lens: list[int], dtype: torch.dtype) -> None:
    batch = make_batch([1] * 5, context_lens, 9, 3, 64, dtype, CPU, seed=2)
    assert_close(run_cpu(batch, 0.125), batch, 0.125)


def test_equal_prefills_over_cached_prefix_batch_together() -> None:
    batch = make_batch([12, 12, 12], [20, 20, 20], 8, 2, 32, torch.float32, CPU, block_size=8)
    assert_close(run_cpu(batch, 0.2), batch, 0.2)


def test_padding_rows_and_empty_batch() -> None:
    batch = make_batch([1, 1, 6], [9, 9, 0], 4, 2, 64, torch.float32, CPU, padding_tokens=3)
    assert_close(run_cpu(batch, 0.125), batch, 0.125)
    q = torch.randn(2, 4, 64)
    out = paged_attention_cpu(q, batch.kv_cache, batch.block_tables[:0], [], [], 0.125)
    assert out.shape == q.shape


@pytest.mark.parametrize("max_keys", [1, 40, 100])
def test_large_groups_split_into_bounded_calls(
    max_keys: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Five fresh prompts and three chunks over a prefix, two groups cut into several calls
    # (a bound below one sequence's context still runs that sequence alone).
    monkeypatch.setattr(paged_attention_module, "_MAX_PREFILL_GROUP_KEYS", max_keys)
    query_lens = [6] * 5 + [4] * 3 + [1, 1]
    context_lens = [0] * 5 + [11] * 3 + [5, 30]
    batch = make_batch(query_lens, context_lens, 9, 3, 64, torch.float32, CPU, block_size=4)
    assert_close(run_cpu(batch, 0.125), batch, 0.125)
