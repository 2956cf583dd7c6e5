"""The routing kernel against the torch reference (transformers' softmax, top-k, renormalise).

Runs on CUDA when there is one, else under Triton's interpreter. Random fp32 logits have no
ties, so ids must match exactly and weights to fp32 rounding (the kernel's exp and sums differ
from torch's in the last bits); a tie goes to the lowest expert index.
"""

from __future__ import annotations

import pytest
import torch

from pagedserve.kernels.moe_routing import route_top_k, route_top_k_ref, route_top_k_triton


@pytest.mark.parametrize(
    "tokens,experts,top_k,renormalize,dtype",
    [
        (1, 8, 2, True, torch.float32),  # Mixtral's shape, one decode token
        (33, 8, 2, False, torch.float32),
        (17, 60, 4, True, torch.float32),  # not a power of two: padded lanes never chosen
        (9, 128, 8, True, torch.float16),  # Qwen3-MoE's, logits in the model dtype
        (5, 16, 16, False, torch.float32),  # every expert chosen
    ],
)
def test_kernel_matches_reference(
    tokens: int, experts: int, top_k: int, renormalize: bool, dtype: torch.dtype,
    device: torch.device,
) -> None:
    gen = torch.Generator().manual_seed(tokens * experts + top_k)
    logits = (torch.randn(tokens, experts, generator=gen) * 3).to(device, dtype)
    if dtype != torch.float32:  # rounded logits can tie: keep the ties off the boundary
        logits = logits + torch.arange(experts, device=device, dtype=dtype) * 1e-3
    weights, ids = route_top_k_triton(logits, top_k, renormalize)
    ref_weights, ref_ids = route_top_k_ref(logits, top_k, renormalize)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids.long().cpu(), ref_ids.cpu())
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
    if renormalize:
        torch.testing.assert_close(weights.sum(-1), torch.ones(tokens, device=device))


def test_ties_go_to_the_lowest_expert(device: torch.device) -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 1.0, 2.0]], device=device)
    weights, ids = route_top_k_triton(logits, 4, renormalize=False)
    assert ids.tolist() == [[1, 3, 5, 2]]
    assert weights[0, 0] == weights[0, 1] == weights[0, 2] > weights[0, 3]


def test_strided_and_empty_inputs(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(1)
    wide = torch.randn(6, 20, generator=gen).to(device)
    logits = wide[:, 2:14]  # rows 20 apart, columns contiguous
    weights, ids = route_top_k_triton(logits, 3, renormalize=True)
    ref_weights, ref_ids = route_top_k_ref(logits, 3, renormalize=True)
    assert torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
    empty_weights, empty_ids = route_top_k_triton(wide[:0, :8], 2, renormalize=True)
    assert empty_weights.shape == empty_ids.shape == (0, 2)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"\[tokens, experts\]"):
        route_top_k_triton(torch.zeros(8), 2, renormalize=True)
    with pytest.raises(ValueError, match="between 1 and the number of experts"):
        route_top_k_triton(torch.zeros(2, 4), 5, renormalize=True)


def test_dispatch_off_cuda_is_reference() -> None:
    logits = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    for got, want in zip(route_top_k(logits, 2, True), route_top_k_ref(logits, 2, True)):
        assert torch.equal(got, want)
