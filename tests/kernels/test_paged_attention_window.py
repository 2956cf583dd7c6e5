"""Sliding-window attention and attention-logit soft-capping, on every path: the torch
reference against transformers' own mask and eager attention, then the CPU serving path and
the Triton kernels (interpreted on CPU, fp32 and fp16) against the reference.

Windows are chosen around the cache block size (16) and the small test tiles (16 keys): 1, a
window ending inside a block (7, 33), on a block edge (16, 32) and longer than every sequence
(500), over fresh prefills, prefill chunks whose cached prefix starts before the window, and
decodes of contexts shorter and longer than the window.
"""

from __future__ import annotations

import pytest
import torch

from pagedserve.backend.runner.attention import (
    AttentionMetadata,
    TorchAttentionBackend,
    TritonAttentionBackend,
)
from pagedserve.kernels.paged_attention import (
    paged_attention_cpu,
    paged_attention_ref,
    paged_attention_triton,
    visible_keys,
)
from tests.kernels.paged_batch import Batch, make_batch, reference
from tests.kernels.test_paged_attention import SMALL_TILES, assert_close

CPU = torch.device("cpu")
WINDOWS = [1, 7, 16, 33, 500]
SOFTCAP = 2.0  # small against the ~N(0, 1.5) test scores, so capping changes every output
# Fresh prefill, chunks over a prefix longer than every window but the last, decodes, an idle
# sequence and a prefill chunk that starts inside the window of its own first query.
QUERY_LENS = [40, 11, 1, 1, 0, 9]
CONTEXT_LENS = [0, 37, 52, 5, 9, 20]


def _run_triton(batch: Batch, scale: float, **kwargs: object) -> torch.Tensor:
    return paged_attention_triton(
        batch.q, batch.kv_cache, batch.block_tables, batch.query_start_loc, batch.seq_lens,
        scale, max_query_len=max(batch.query_lens), max_seq_len=max(batch.seq_lens_list),
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("window", [1, 3, 8, 64])
@pytest.mark.parametrize("softcap", [None, SOFTCAP])
def test_reference_equals_transformers_mask_and_eager_attention(
    window: int, softcap: float | None
) -> None:
    """The window convention (W keys, the query's own included) and the cap are transformers'
    (Mistral, Gemma 2 and Gemma 3 share its sliding mask; Gemma 2 caps in eager attention)."""
    from transformers.masking_utils import sliding_window_causal_mask_function
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    seq_len, n = 40, 40
    batch = make_batch([n], [0], 8, 2, 16, torch.float32, CPU, block_size=4, seed=3)
    rule = sliding_window_causal_mask_function(window)
    want_mask = torch.tensor(
        [[bool(rule(0, 0, torch.tensor(qi), torch.tensor(ki))) for ki in range(seq_len)] for qi in range(n)]
    )
    positions = torch.arange(seq_len)
    assert torch.equal(visible_keys(positions, positions, window), want_mask)

    k, v = (batch.kv_cache[i, batch.block_tables[0, :10].long()].flatten(0, 1) for i in (0, 1))
    additive = torch.zeros(n, seq_len).masked_fill(~want_mask, float("-inf"))
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = 4, False
    want, _ = eager_attention_forward(
        module, batch.q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        additive[None, None], scaling=0.3, softcap=softcap,
    )
    got = reference(batch, 0.3, sliding_window=window, softcap=softcap)
    torch.testing.assert_close(got, want[0], rtol=0, atol=2e-6)


@pytest.mark.parametrize(
    "window,softcap,block_size",
    [(1, None, 4), (7, SOFTCAP, 4), (16, None, 16), (16, SOFTCAP, 4), (33, None, 16),
     (33, SOFTCAP, 4), (500, SOFTCAP, 16)],
)
def test_cpu_path_matches_reference(window: int, softcap: float | None, block_size: int) -> None:
    # Repeated shapes so prefill and decode groups of several sequences form.
    query_lens = QUERY_LENS + [11, 1, 1]
    context_lens = CONTEXT_LENS + [37, 52, 70]
    batch = make_batch(
        query_lens, context_lens, 9, 3, 32, torch.float32, CPU, block_size=block_size,
        padding_tokens=2, seed=window,
    )
    out = paged_attention_cpu(
        batch.q, batch.kv_cache, batch.block_tables, batch.query_lens, batch.seq_lens_list, 0.2,
        sliding_window=window, softcap=softcap,
    )
    rows = batch.num_real_tokens
    ref = reference(batch, 0.2, sliding_window=window, softcap=softcap)
    assert (out[:rows] - ref[:rows]).abs().max().item() <= 2e-6


@pytest.mark.parametrize("window", [7, 33])
def test_pure_decode_cpu_path_matches_reference(window: int) -> None:
    for context_lens in ([40] * 4, [3, 17, 16, 40]):
        batch = make_batch([1] * 4, context_lens, 8, 2, 32, torch.float32, CPU, block_size=4)
        out = paged_attention_cpu(
            batch.q, batch.kv_cache, batch.block_tables, batch.query_lens, batch.seq_lens_list,
            0.2, sliding_window=window,
        )
        ref = reference(batch, 0.2, sliding_window=window)
        assert (out - ref).abs().max().item() <= 2e-6


def test_window_changes_the_result() -> None:
    """Guards the tests above: on these batches a window (or a cap) is not a no-op."""
    batch = make_batch(QUERY_LENS, CONTEXT_LENS, 8, 2, 32, torch.float32, CPU)
    full = reference(batch, 0.2)
    rows = batch.num_real_tokens
    for window in WINDOWS[:-1]:
        assert (reference(batch, 0.2, sliding_window=window)[:rows] - full[:rows]).abs().max() > 0.1
    assert torch.equal(reference(batch, 0.2, sliding_window=500)[:rows], full[:rows])
    assert (reference(batch, 0.2, softcap=SOFTCAP)[:rows] - full[:rows]).abs().max() > 0.01


# (window, softcap, dtype): every window once in fp32, the cap on and off, two in fp16 (the
# interpreter is slow: each case is a few seconds).
TRITON_CASES = [
    (1, None, torch.float32),
    (7, SOFTCAP, torch.float32),
    (16, None, torch.float32),
    (33, SOFTCAP, torch.float32),
    (500, SOFTCAP, torch.float32),
    (7, None, torch.float16),
    (33, SOFTCAP, torch.float16),
]


@pytest.mark.parametrize("window,softcap,dtype", TRITON_CASES)
def test_triton_varlen_matches_reference(
    window: int, softcap: float | None, dtype: torch.dtype, device: torch.device
) -> None:
    batch = make_batch(QUERY_LENS, CONTEXT_LENS, 4, 1, 32, dtype, device, seed=window)
    out = _run_triton(batch, 0.125, config=SMALL_TILES, sliding_window=window, softcap=softcap)
    ref = reference(batch, 0.125, sliding_window=window, softcap=softcap)
    assert_close(out, ref, batch.num_real_tokens)


@pytest.mark.parametrize("window,softcap,dtype", TRITON_CASES)
def test_triton_decode_split_kv_matches_reference(
    window: int, softcap: float | None, dtype: torch.dtype, device: torch.device
) -> None:
    # Contexts shorter than, at and past the windows, on and off block edges.
    context_lens = [70, 5, 32, 0, 47]
    batch = make_batch([1] * 5, context_lens, 4, 1, 32, dtype, device, seed=window)
    ref = reference(batch, 0.125, sliding_window=window, softcap=softcap)
    # 1: single pass; 3: uneven partitions, more of them than key tiles in the short windows.
    for splits in (1, 3):
        out = _run_triton(
            batch, 0.125, num_kv_splits=splits, config=SMALL_TILES, sliding_window=window,
            softcap=softcap,
        )
        assert_close(out, ref, batch.num_real_tokens)


def test_triton_default_tiles_wider_than_the_window(device: torch.device) -> None:
    """Default tiles (128 keys, several query rows per block) with a window ending inside
    one tile and spanning two."""
    batch = make_batch([130, 1, 20], [0, 150, 120], 4, 1, 32, torch.float32, device, seed=4)
    for window in (20, 130):
        ref = reference(batch, 0.125, sliding_window=window)
        assert_close(_run_triton(batch, 0.125, sliding_window=window), ref, batch.num_real_tokens)


@pytest.mark.parametrize("max_query_len", [1, 5])
def test_backends_agree_with_window_and_softcap(max_query_len: int, device: torch.device) -> None:
    """End to end through AttentionBackend (cache write, then attention) with a layer's
    window and cap passed through."""
    query_lens = [1, 1, 1] if max_query_len == 1 else [5, 1, 3]
    batch = make_batch(query_lens, [40, 17, 21], 8, 2, 64, torch.float32, device)
    gen = torch.Generator().manual_seed(3)
    shape = (batch.q.shape[0], 2, 64)
    k = torch.randn(shape, generator=gen).to(device)
    v = torch.randn(shape, generator=gen).to(device)
    metadata = AttentionMetadata(
        slot_mapping=batch.slot_mapping, query_start_loc=batch.query_start_loc,
        seq_lens=batch.seq_lens, block_tables=batch.block_tables,
        max_query_len=max_query_len, max_seq_len=max(batch.seq_lens_list),
        query_lens_cpu=query_lens, seq_lens_cpu=batch.seq_lens_list,
    )
    options = {"sliding_window": 9, "softcap": SOFTCAP}
    cache_ref = batch.kv_cache.clone()
    ref = TorchAttentionBackend().forward(batch.q, k, v, cache_ref, metadata, 0.125, **options)
    cache = batch.kv_cache.clone()
    out = TritonAttentionBackend(SMALL_TILES).forward(batch.q, k, v, cache, metadata, 0.125, **options)
    assert torch.equal(cache, cache_ref)
    assert_close(out, ref, batch.num_real_tokens)
    plain = TorchAttentionBackend().forward(batch.q, k, v, batch.kv_cache.clone(), metadata, 0.125)
    assert (plain - ref).abs().max() > 0.01  # the options reached the attention


def test_bad_window_and_cap_raise() -> None:
    batch = make_batch([2], [3], 4, 2, 16, torch.float32, CPU)
    args = (batch.q, batch.kv_cache, batch.block_tables, [2], [5], 0.1)
    with pytest.raises(ValueError, match="sliding_window must be a positive"):
        paged_attention_ref(*args, sliding_window=0)
    with pytest.raises(ValueError, match="softcap must be positive"):
        paged_attention_cpu(*args, softcap=-1.0)
    with pytest.raises(ValueError, match="sliding_window must be a positive"):
        _run_triton(batch, 0.1, sliding_window=-4)
