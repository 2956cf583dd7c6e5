"""Triton KV-cache write against the torch reference."""

from __future__ import annotations

import pytest
import torch

from pagedserve.kernels.kv_cache import write_kv_cache, write_kv_cache_ref, write_kv_cache_triton

POISON = -777.0


def _inputs(
    num_tokens: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
    dtype: torch.dtype, device: torch.device, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """K/V as strided views of a fused QKV projection, distinct random slots with padding (-1)
    sprinkled in, and a cache filled with a poison value."""
    gen = torch.Generator().manual_seed(seed)
    num_slots = num_blocks * block_size
    slots = torch.randperm(num_slots, generator=gen)[:num_tokens]
    slots[torch.rand(num_tokens, generator=gen) < 0.3] = -1
    qkv = torch.randn(num_tokens, 3 * num_kv_heads * head_dim, generator=gen).to(device, dtype)
    k = qkv[:, num_kv_heads * head_dim : 2 * num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, 2 * num_kv_heads * head_dim :].view(num_tokens, num_kv_heads, head_dim)
    cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), POISON, dtype=dtype, device=device)
    return k, v, cache, slots.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128, 80])
@pytest.mark.parametrize("block_size", [16, 8])
def test_write_matches_reference_and_skips_padding(
    dtype: torch.dtype, head_dim: int, block_size: int, device: torch.device
) -> None:
    k, v, cache, slots = _inputs(24, 5, block_size, 2, head_dim, dtype, device)
    assert not k.is_contiguous()
    expected = cache.clone()
    write_kv_cache_ref(k, v, expected, slots)
    write_kv_cache_triton(k, v, cache, slots)
    assert torch.equal(cache, expected)

    # Per slot (token position in the cache): written iff some token mapped to it.
    flat = cache.flatten(1, 2).cpu()  # [2, num_slots, num_kv_heads, head_dim]
    valid = slots[slots >= 0].cpu()
    assert valid.numel() > 0 and bool((slots < 0).any())
    untouched = torch.ones(flat.shape[1], dtype=torch.bool)
    untouched[valid] = False
    assert bool((flat[:, untouched] == POISON).all())
    assert bool((flat[:, valid] != POISON).all())


def test_dispatch_and_all_padding(device: torch.device) -> None:
    k, v, cache, slots = _inputs(6, 2, 16, 1, 64, torch.float32, device)
    slots.fill_(-1)
    before = cache.clone()
    write_kv_cache_triton(k, v, cache, slots)
    assert torch.equal(cache, before)
    k, v, cache, slots = _inputs(6, 2, 16, 1, 64, torch.float32, torch.device("cpu"))
    expected = cache.clone()
    write_kv_cache_ref(k, v, expected, slots)
    write_kv_cache(k, v, cache, slots)
    assert torch.equal(cache, expected)


def test_shape_mismatch_raises(device: torch.device) -> None:
    k, v, cache, slots = _inputs(4, 2, 16, 2, 64, torch.float32, device)
    with pytest.raises(ValueError, match="do not match"):
        write_kv_cache_triton(k[:, :1], v[:, :1], cache, slots)
    with pytest.raises(ValueError, match="one slot per token"):
        write_kv_cache_triton(k, v, cache, slots[:2])
