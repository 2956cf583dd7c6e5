"""Triton rotary embedding against the torch reference, with and without Llama-3 scaling."""

from __future__ import annotations

import pytest
import torch

from pagedserve.kernels.rotary import (
    apply_rotary,
    apply_rotary_ref,
    apply_rotary_triton,
    cos_sin_cache,
    rope_inv_freq,
)

LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
# Same ops, same roundings: fp32 differs only by fma contraction, fp16 by one rounding at most.
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3}
MAX_POSITION = 512


def _inputs(
    num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
    scaling: dict[str, object] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(head_dim + num_heads)
    num_tokens = 9
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(device, dtype)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(device, dtype)
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), generator=gen).to(device)
    cache = cos_sin_cache(rope_inv_freq(head_dim, 10000.0, scaling), MAX_POSITION).to(device)
    return q, k, positions, cache


@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING], ids=["default", "llama3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,head_dim", [((4, 4), 64), ((12, 2), 128), ((2, 1), 80)])
def test_rotary_matches_reference(
    heads: tuple[int, int], head_dim: int, dtype: torch.dtype, scaling: dict[str, object] | None,
    device: torch.device,
) -> None:
    q, k, positions, cache = _inputs(*heads, head_dim, dtype, device, scaling)
    q_ref, k_ref = apply_rotary_ref(q, k, positions, cache)
    q_out, k_out = apply_rotary_triton(q, k, positions, cache)
    torch.testing.assert_close(q_out, q_ref, rtol=0, atol=ATOL[dtype])
    torch.testing.assert_close(k_out, k_ref, rtol=0, atol=ATOL[dtype])
    assert not torch.equal(q_out, q)  # out of place: inputs kept

    q_in, k_in = q.clone(), k.clone()
    q_ret, k_ret = apply_rotary_triton(q_in, k_in, positions, cache, inplace=True)
    assert q_ret.data_ptr() == q_in.data_ptr() and k_ret.data_ptr() == k_in.data_ptr()
    torch.testing.assert_close(q_in, q_ref, rtol=0, atol=ATOL[dtype])
    torch.testing.assert_close(k_in, k_ref, rtol=0, atol=ATOL[dtype])


def test_strided_views_of_fused_qkv(device: torch.device) -> None:
    """q and k as views of one fused QKV projection (token stride > heads * head_dim)."""
    gen = torch.Generator().manual_seed(5)
    heads, kv_heads, head_dim, tokens = 4, 2, 64, 5
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(device)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    positions = torch.arange(tokens, device=device) * 37
    cache = cos_sin_cache(rope_inv_freq(head_dim, 500000.0, LLAMA3_SCALING), MAX_POSITION).to(device)
    q_ref, k_ref = apply_rotary_ref(q, k, positions, cache)
    v_before = qkv[:, (heads + kv_heads) * head_dim :].clone()
    apply_rotary_triton(q, k, positions, cache, inplace=True)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(k, k_ref, rtol=0, atol=1e-5)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim :], v_before)


def test_dispatch_off_cuda_honours_inplace() -> None:
    q, k, positions, cache = _inputs(4, 2, 64, torch.float32, torch.device("cpu"), None)
    q_ref, k_ref = apply_rotary_ref(q, k, positions, cache)
    q_out, k_out = apply_rotary(q, k, positions, cache)
    assert torch.equal(q_out, q_ref) and torch.equal(k_out, k_ref)
    apply_rotary(q, k, positions, cache, inplace=True)
    assert torch.equal(q, q_ref) and torch.equal(k, k_ref)
