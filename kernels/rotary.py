"""Rotary position embedding (rotate-half layout), with Llama-3 and LongRoPE frequency scaling."""

from __future__ import annotations

import math
from typing import Any

import torch

from pagedserve.kernels.triton_utils import next_power_of_2, tl, triton, use_triton

# Heads rotated per loop step: a [heads, head_dim / 2] tile small enough to stay in registers.
_ROTARY_HEADS_PER_STEP = 8



def rope_inv_freq(head_dim: int, base: float, rope_scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in fp32; applies ``rope_type == "llama3"`` scaling."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
    if rope_type in (None, "default"):
        return inv_freq
    if rope_type != "llama3":
        raise NotImplementedError(f"rope scaling type {rope_type!r} is not supported")
    assert rope_scaling is not None
    factor = rope_scaling["factor"]
    low_freq_factor = rope_scaling["low_freq_factor"]
    high_freq_factor = rope_scaling["high_freq_factor"]
    old_context_len = rope_scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def longrope_inv_freq(rotary_dim: int, base: float, factors: list[float]) -> torch.Tensor:
    """LongRoPE (Phi-3) inverse frequencies [rotary_dim // 2] in fp32: each default frequency
    divided by its own rescale factor, in transformers' order of ops (so the fp32 table matches
    its table bit for bit)."""
    if len(factors) != rotary_dim // 2:
        raise ValueError(f"LongRoPE needs {rotary_dim // 2} rescale factors, got {len(factors)}")
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    return 1.0 / (torch.tensor(factors, dtype=torch.float32) * base**exponents)


def longrope_attention_factor(factor: float, original_max_position: int) -> float:
    """The factor LongRoPE scales cos and sin by when the context was stretched ``factor``
    times beyond the pretraining length: sqrt(1 + ln(factor) / ln(original))."""
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(original_max_position))


def cos_sin_cache(inv_freq: torch.Tensor, max_position: int) -> torch.Tensor:
    """[max_position, head_dim] fp32: cos of each position's angles, then sin."""
    t = torch.arange(max_position, dtype=torch.int64).float()
    freqs = torch.outer(t, inv_freq.float())
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def apply_rotary_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [num_tokens] int64
    cache: torch.Tensor,  # [max_position, head_dim] from cos_sin_cache
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns rotated (q, k) in their dtypes; cos/sin are cast to that dtype first, as
    transformers does, so fp32 results match it exactly."""
    cos, sin = rotary_cos_sin(positions, cache, q.dtype)
    return apply_rotary_cos_sin(q, k, cos, sin)


def rotary_cos_sin(
    positions: torch.Tensor, cache: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's per-token cos and sin, [num_tokens, 1, head_dim] in ``dtype``: the same
    for every layer of a forward, so a model may compute them once and reuse them."""
    half = cache.shape[-1] // 2
    cs = cache[positions]
    cos = cs[:, :half].repeat(1, 2).unsqueeze(1).to(dtype)
    sin = cs[:, half:].repeat(1, 2).unsqueeze(1).to(dtype)
    return cos, sin


def apply_rotary_cos_sin(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


@triton.jit
def _rotary_heads(
    x_ptr,
    out_ptr,
    token,
    num_heads,
    x_token_stride,
    x_head_stride,
    out_token_stride,
    out_head_stride,
    cos,
    sin,
    half_cols,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    col_mask = half_cols < HALF
    for h0 in range(0, num_heads, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        mask = (heads[:, None] < num_heads) & col_mask[None, :]
        src = x_ptr + token * x_token_stride + heads[:, None] * x_head_stride + half_cols[None, :]
        x1 = tl.load(src, mask=mask, other=0.0)
        x2 = tl.load(src + HALF, mask=mask, other=0.0)
        dtype = x1.dtype
        x1 = x1.to(tl.float32)
        x2 = x2.to(tl.float32)
        # Each product and the sum are rounded to the input dtype, as the reference's torch ops are.
        out1 = ((x1 * cos).to(dtype).to(tl.float32) - (x2 * sin).to(dtype).to(tl.float32)).to(dtype)
        out2 = ((x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)).to(dtype)
        dst = out_ptr + token * out_token_stride + heads[:, None] * out_head_stride + half_cols[None, :]
        tl.store(dst, out1, mask=mask)
        tl.store(dst + HALF, out2, mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    positions_ptr,
    cache_ptr,
    num_heads,
    num_kv_heads,
    q_token_stride,
    q_head_stride,
    k_token_stride,
    k_head_stride,
    q_out_token_stride,
    q_out_head_stride,
    k_out_token_stride,
    k_out_head_stride,
    cache_row_stride,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    half_cols = tl.arange(0, HALF_PAD)
    col_mask = half_cols < HALF
    cos = tl.load(cache_ptr + pos * cache_row_stride + half_cols, mask=col_mask, other=0.0)
    sin = tl.load(cache_ptr + pos * cache_row_stride + HALF + half_cols, mask=col_mask, other=0.0)
    # cos/sin are rounded to the activation dtype first, as the reference (and transformers) do.
    dtype = q_ptr.dtype.element_ty
    cos = cos.to(dtype).to(tl.float32)[None, :]
    sin = sin.to(dtype).to(tl.float32)[None, :]
    _rotary_heads(
        q_ptr, q_out_ptr, token, num_heads, q_token_stride, q_head_stride,
        q_out_token_stride, q_out_head_stride, cos, sin, half_cols, HALF, BLOCK_H,
    )
    _rotary_heads(
        k_ptr, k_out_ptr, token, num_kv_heads, k_token_stride, k_head_stride,
        k_out_token_stride, k_out_head_stride, cos, sin, half_cols, HALF, BLOCK_H,
    )


def apply_rotary_triton(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [num_tokens] int64
    cache: torch.Tensor,  # [max_position, head_dim] from cos_sin_cache
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton rotary embedding of q and k; ``inplace`` overwrites them (and returns them)."""
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim or cache.shape[-1] != head_dim or head_dim % 2:
        raise ValueError("q, k and the cos/sin cache must share an even head_dim")
    if q.dtype != k.dtype:
        raise ValueError("q and k must share a dtype")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        if inplace:
            raise ValueError("in-place rotary needs a unit stride on head_dim")
        q, k = q.contiguous(), k.contiguous()
    cache = cache if cache.stride(-1) == 1 else cache.contiguous()
    q_out = q if inplace else torch.empty_like(q)
    k_out = k if inplace else torch.empty_like(k)
    num_tokens = q.shape[0]
    if num_tokens > 0:
        half = head_dim // 2
        _rotary_kernel[(num_tokens,)](
            q, k, q_out, k_out, positions, cache,
            q.shape[1], k.shape[1],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            cache.stride(0),
            HALF=half,
            HALF_PAD=next_power_of_2(half),
            BLOCK_H=_ROTARY_HEADS_PER_STEP,
            # Without this the compiler fuses each rounded product into the add after it
            # (one FMA, one rounding), and 13-17% of bf16 outputs differ from torch's.
            enable_fp_fusion=False,
        )
    return q_out, k_out


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cache: torch.Tensor,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding: the Triton kernel on CUDA, the torch reference elsewhere.

    ``inplace`` lets the CUDA path write into q and k; the reference path copies its result
    back so both paths honour it.
    """
    if use_triton(q):
        return apply_rotary_triton(q, k, positions, cache, inplace=inplace)
    q_rot, k_rot = apply_rotary_ref(q, k, positions, cache)
    if inplace:
        q.copy_(q_rot)
        k.copy_(k_rot)
        return q, k
    return q_rot, k_rot
