"""Writing a step's new K/V into the paged cache, addressed by a per-token slot mapping."""

from __future__ import annotations

import torch

from pagedserve.kernels.triton_utils import next_power_of_2, tl, triton, use_triton


def write_kv_cache_ref(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip (padding)
) -> None:
    """Reference: cache[slot] = k/v for every token whose slot is not negative."""
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    k_flat = kv_cache[0].view(-1, num_kv_heads, head_dim)
    v_flat = kv_cache[1].view(-1, num_kv_heads, head_dim)
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        slot_mapping, k, v = slot_mapping[valid], k[valid], v[valid]
    k_flat.index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    v_flat.index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


@triton.jit
def _write_kv_cache_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    head_dim,
    k_token_stride,
    k_head_stride,
    v_token_stride,
    v_head_stride,
    cache_block_stride,
    cache_slot_stride,
    cache_head_stride,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:
        cols = tl.arange(0, HEAD_DIM_PAD)
        mask = cols < head_dim
        dst = (slot // BLOCK_SIZE) * cache_block_stride + (slot % BLOCK_SIZE) * cache_slot_stride
        dst += head * cache_head_stride + cols
        k = tl.load(k_ptr + token * k_token_stride + head * k_head_stride + cols, mask=mask)
        v = tl.load(v_ptr + token * v_token_stride + head * v_head_stride + cols, mask=mask)
        tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache_triton(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip (padding)
) -> None:
    """Triton cache[slot] = k/v; tokens with a negative slot are skipped on the device, so the
    launch never depends on the mapping's contents (CUDA-graph safe)."""
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    if k.shape[1:] != (num_kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(f"k/v {tuple(k.shape)} do not match the cache {tuple(kv_cache.shape)}")
    if slot_mapping.shape[0] != k.shape[0]:
        raise ValueError("slot_mapping needs one slot per token")
    if k.stride(-1) != 1 or v.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("k, v and kv_cache need a unit stride on head_dim")
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _write_kv_cache_kernel[(num_tokens, num_kv_heads)](
        k, v, k_cache, v_cache, slot_mapping,
        head_dim,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BLOCK_SIZE=block_size,
        HEAD_DIM_PAD=next_power_of_2(head_dim),
    )


def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Write this step's K/V into the paged cache: Triton on CUDA, the torch reference elsewhere."""
    if use_triton(kv_cache):
        write_kv_cache_triton(k, v, kv_cache, slot_mapping)
    else:
        write_kv_cache_ref(k, v, kv_cache, slot_mapping)
