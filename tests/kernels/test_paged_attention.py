"""Triton paged attention (varlen and split-KV decode) against the torch reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pagedserve.backend.runner.attention import AttentionMetadata, TorchAttentionBackend
from pagedserve.backend.runner.attention import TritonAttentionBackend
from pagedserve.kernels.paged_attention import (
    AttentionKernelConfig,
    _join_lane_sums,
    _lane_partial_sums,
    choose_num_kv_splits,
    paged_attention,
    paged_attention_triton,
)
from pagedserve.kernels.triton_utils import tl, triton
from tests.kernels.paged_batch import Batch, make_batch, reference

# Max abs error vs the reference (inputs ~N(0,1), outputs are convex mixes of V rows).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}
# Small tiles so short contexts still cross several key tiles and query blocks.
SMALL_TILES = AttentionKernelConfig(block_m=16, block_n=16, block_n_wide_heads=16, decode_block_n=16)
HEAD_CONFIGS = [(4, 4), (8, 2), (8, 1)]  # GQA ratios 1, 4, 8


def run_triton(batch: Batch, scale: float, **kwargs: object) -> torch.Tensor:
    return paged_attention_triton(
        batch.q,
        batch.kv_cache,
        batch.block_tables,
        batch.query_start_loc,
        batch.seq_lens,
        scale,
        max_query_len=max(batch.query_lens),
        max_seq_len=max(batch.seq_lens_list),
        **kwargs,  # type: ignore[arg-type]
    )


def assert_close(out: torch.Tensor, ref: torch.Tensor, rows: int) -> None:
    err = (out[:rows].float() - ref[:rows].float()).abs().max().item()
    assert err <= TOLERANCE[out.dtype], f"max abs error {err} > {TOLERANCE[out.dtype]}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", HEAD_CONFIGS)
def test_mixed_prefill_chunks_and_decodes(
    num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
) -> None:
    # Fresh prefill, prefill chunk over a cached prefix, decodes, an idle sequence (0 queries).
    query_lens = [19, 11, 1, 1, 0, 4]
    context_lens = [0, 37, 52, 0, 9, 16]
    batch = make_batch(query_lens, context_lens, num_heads, num_kv_heads, head_dim, dtype, device)
    scale = head_dim**-0.5
    out = run_triton(batch, scale, config=SMALL_TILES)
    assert out.dtype == dtype and out.shape == batch.q.shape
    assert_close(out, reference(batch, scale), batch.num_real_tokens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_heads,num_kv_heads", HEAD_CONFIGS)
def test_decode_split_kv_matches_reference(
    num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device
) -> None:
    context_lens = [70, 5, 33, 0]
    batch = make_batch([1] * 4, context_lens, num_heads, num_kv_heads, head_dim, dtype, device)
    scale = head_dim**-0.5
    ref = reference(batch, scale)
    # 1: single pass; 3: uneven partitions; 8: more partitions than key tiles (empty ones).
    for splits in (1, 3, 8):
        out = run_triton(batch, scale, num_kv_splits=splits, config=SMALL_TILES)
        assert_close(out, ref, batch.num_real_tokens)


@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_block_sizes_and_default_tiles(block_size: int, device: torch.device) -> None:
    """The cache block size is a parameter; default tiles span several blocks per key tile."""
    query_lens, context_lens = [40, 1, 7], [30, 90, 0]
    batch = make_batch(
        query_lens, context_lens, 8, 2, 64, torch.float32, device, block_size=block_size, seed=1
    )
    ref = reference(batch, 0.1)
    assert_close(run_triton(batch, 0.1), ref, batch.num_real_tokens)
    decode = make_batch([1, 1], [130, 64], 8, 2, 64, torch.float32, device, block_size=block_size)
    assert_close(run_triton(decode, 0.1, num_kv_splits=2), reference(decode, 0.1), 2)


def test_non_power_of_two_head_dim(device: torch.device) -> None:
    batch = make_batch([6, 1], [10, 20], 4, 2, 80, torch.float32, device, seed=2)
    assert_close(run_triton(batch, 0.1, config=SMALL_TILES), reference(batch, 0.1), 7)


@pytest.mark.parametrize("max_query_len", [1, 5])
def test_padding_tokens_and_sequences_untouched(max_query_len: int, device: torch.device) -> None:
    """Graph-style padding: token rows past query_start_loc[-1] and sequences with no query keep
    whatever the output buffer held."""
    query_lens = [1, 0, 1] if max_query_len == 1 else [5, 0, 1]
    batch = make_batch(query_lens, [20, 7, 3], 8, 2, 64, torch.float32, device, padding_tokens=3)
    poison = 1234.5
    out = torch.full_like(batch.q, poison)
    for splits in (1, 2):
        run_triton(batch, 0.125, out=out, num_kv_splits=splits, config=SMALL_TILES)
        assert_close(out, reference(batch, 0.125), batch.num_real_tokens)
        assert bool((out[batch.num_real_tokens :] == poison).all())


def test_dispatch_uses_reference_off_cuda() -> None:
    batch = make_batch([3, 1], [4, 9], 4, 2, 64, torch.float32, torch.device("cpu"))
    out = paged_attention(
        batch.q, batch.kv_cache, batch.block_tables, batch.query_start_loc, batch.seq_lens,
        0.125, max_query_len=3, max_seq_len=10,
    )
    torch.testing.assert_close(out, reference(batch, 0.125), rtol=0, atol=0)


def test_bad_shapes_raise_value_error() -> None:
    batch = make_batch([2], [3], 6, 4, 64, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="group"):
        run_triton(batch, 0.1)
    batch = make_batch([2], [3], 4, 2, 64, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="num_seqs"):
        paged_attention_triton(
            batch.q, batch.kv_cache, batch.block_tables, batch.query_start_loc[:1],
            batch.seq_lens, 0.1, max_query_len=2, max_seq_len=5,
        )


def test_bad_config_and_out_raise() -> None:
    with pytest.raises(ValueError, match="block_n"):
        AttentionKernelConfig(block_n=24)
    batch = make_batch([2], [3], 4, 2, 64, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="out must match"):
        run_triton(batch, 0.1, out=torch.empty_like(batch.q, dtype=torch.float16))


def test_choose_num_kv_splits() -> None:
    config = AttentionKernelConfig(split_waves=2, max_kv_splits=32, min_tokens_per_split=256)
    # Enough (sequence, KV head) programs to fill the GPU: no split.
    assert choose_num_kv_splits(32, 8, 32768, 132, config) == 1
    # One long sequence: occupancy wants 33, the cap allows 32.
    assert choose_num_kv_splits(1, 8, 32768, 132, config) == 32
    # Short contexts bound the split by min_tokens_per_split.
    assert choose_num_kv_splits(1, 8, 1000, 132, config) == 3
    assert choose_num_kv_splits(1, 8, 100, 132, config) == 1
    # Moderate batch: ceil(2 * 132 / 64) = 5.
    assert choose_num_kv_splits(8, 8, 32768, 132, config) == 5


@pytest.mark.parametrize("num_kv_splits", [None, 4])
def test_triton_backend_matches_torch_backend(
    num_kv_splits: int | None, device: torch.device
) -> None:
    """End to end through AttentionBackend: cache write with padding slots, then attention."""
    num_heads, num_kv_heads, head_dim = 8, 2, 64
    for query_lens, context_lens in (([9, 1, 3], [0, 40, 21]), ([1, 1, 1], [50, 17, 0])):
        batch = make_batch(
            query_lens, context_lens, num_heads, num_kv_heads, head_dim, torch.float16, device,
            padding_tokens=2,
        )
        gen = torch.Generator().manual_seed(3)
        shape = (batch.q.shape[0], num_kv_heads, head_dim)
        k = torch.randn(shape, generator=gen).to(device=device, dtype=torch.float16)
        v = torch.randn(shape, generator=gen).to(device=device, dtype=torch.float16)
        metadata = AttentionMetadata(
            slot_mapping=batch.slot_mapping,
            query_start_loc=batch.query_start_loc,
            seq_lens=batch.seq_lens,
            block_tables=batch.block_tables,
            max_query_len=max(query_lens),
            max_seq_len=max(batch.seq_lens_list),
            query_lens_cpu=query_lens,
            seq_lens_cpu=batch.seq_lens_list,
            num_kv_splits=num_kv_splits,
        )
        cache_ref = batch.kv_cache.clone()
        ref = TorchAttentionBackend().forward(batch.q, k, v, cache_ref, metadata, 0.125)
        cache = batch.kv_cache.clone()
        out = TritonAttentionBackend(SMALL_TILES).forward(batch.q, k, v, cache, metadata, 0.125)
        assert torch.equal(cache, cache_ref)
        assert_close(out, ref, batch.num_real_tokens)


@triton.jit
def _lane_sums_probe(p_ptr, partial_ptr, joined_ptr, l4_ptr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Writes _lane_partial_sums of a [ROWS, BLOCK_N] tile and _join_lane_sums of given partials."""
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    lanes = tl.arange(0, 4)
    p = tl.load(p_ptr + rows[:, None] * BLOCK_N + cols[None, :])
    tl.store(partial_ptr + rows[:, None] * 4 + lanes[None, :], _lane_partial_sums(p, BLOCK_N))
    l4 = tl.load(l4_ptr + rows[:, None] * 4 + lanes[None, :])
    tl.store(joined_ptr + rows, _join_lane_sums(l4))


@pytest.mark.parametrize("block_n", [32, 128])
def test_lane_sums_follow_the_mma_columns_and_pairing(block_n: int, device: torch.device) -> None:
    """The 16-bit varlen kernel sums softmax denominators as cuDNN does: partial c holds key
    columns 8j + 2c + e (the columns one thread of a quad owns in the MMA result), and the
    four partials join as (l0 + l1) + (l2 + l3). Integer tiles make the partials exact in any
    order, so this checks which columns each partial gets; the order inside a partial follows
    the GPU's register layout and is checked on the device against cuDNN
    (test_bf16_prefill_rounds_like_cudnn_attention)."""
    rows = 16
    gen = torch.Generator().manual_seed(block_n)
    p = torch.randint(0, 1000, (rows, block_n), generator=gen).float()
    cols = np.arange(block_n)
    expected = torch.stack([p[:, (cols // 2) % 4 == c].sum(1) for c in range(4)], dim=1)
    # Partials of mixed magnitude and sign, where the pairing decides the rounded sum.
    l4 = (torch.randn(rows, 4, generator=gen) * 2.0 ** torch.randint(-24, 24, (rows, 4), generator=gen)).float()
    l4[0] = torch.tensor([1.0, 2.0**-24, -1.0, 2.0**-24])
    f32 = l4.numpy().astype(np.float32)
    joined_expected = (f32[:, 0] + f32[:, 1]) + (f32[:, 2] + f32[:, 3])
    other_pairing = (f32[:, 0] + f32[:, 2]) + (f32[:, 1] + f32[:, 3])
    assert (joined_expected != other_pairing).any()  # the check below can tell them apart

    partial = torch.empty(rows, 4, device=device)
    joined = torch.empty(rows, device=device)
    _lane_sums_probe[(1,)](p.to(device), partial, joined, l4.to(device), ROWS=rows, BLOCK_N=block_n)
    torch.testing.assert_close(partial.cpu(), expected, rtol=0, atol=0)
    assert np.array_equal(joined.cpu().numpy(), joined_expected)
