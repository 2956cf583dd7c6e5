"""Top-k routing of a mixture of experts: softmax over the router's logits in fp32, the k
largest probabilities with their experts, optionally renormalised to sum to one.

The torch reference is what transformers 5 does (softmax, ``topk``, divide by the sum) and
the CPU path. On CUDA one Triton program per token does all of it, where torch takes four to
six kernels per layer (softmax, top-k, sum, divide, casts): at decode batch sizes each of
those costs more than the arithmetic, 48 times a step on Qwen3-30B-A3B.

Ties: the kernel takes the lowest expert index among equal probabilities; torch's ``topk``
does not promise an order among ties. Either choice is a correct top-k.
"""

from __future__ import annotations

import torch

from pagedserve.kernels.triton_utils import next_power_of_2, tl, triton, use_triton


def route_top_k_ref(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (fp32 weights [T, k], expert ids [T, k] int64), descending."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


@triton.jit
def _route_top_k_kernel(
    logits_ptr,
    weights_ptr,
    ids_ptr,
    num_experts,
    logits_row_stride,
    TOP_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, BLOCK_E)
    real = experts < num_experts
    logits = tl.load(
        logits_ptr + token * logits_row_stride + experts, mask=real, other=float("-inf")
    ).to(tl.float32)
    exp = tl.exp(logits - tl.max(logits, 0))
    probs = exp / tl.sum(exp, 0)
    # Padding lanes rank below every real probability (which is >= 0); a chosen expert
    # drops below them.
    remaining = tl.where(real, probs, -1.0)
    slots = tl.arange(0, BLOCK_K)
    top_weights = tl.zeros((BLOCK_K,), dtype=tl.float32)
    top_ids = tl.zeros((BLOCK_K,), dtype=tl.int32)
    for slot in tl.static_range(TOP_K):
        best = tl.max(remaining, 0)
        expert = tl.min(tl.where(remaining == best, experts, BLOCK_E), 0)
        top_weights = tl.where(slots == slot, best, top_weights)
        top_ids = tl.where(slots == slot, expert, top_ids)
        remaining = tl.where(experts == expert, -2.0, remaining)
    if RENORMALIZE:
        top_weights = top_weights / tl.sum(top_weights, 0)
    out = token * TOP_K + slots
    tl.store(weights_ptr + out, top_weights, mask=slots < TOP_K)
    tl.store(ids_ptr + out, top_ids, mask=slots < TOP_K)


def route_top_k_triton(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton routing; ids are int32 (what the MoE kernels index with)."""
    if router_logits.dim() != 2:
        raise ValueError(
            f"router logits must be [tokens, experts], got {tuple(router_logits.shape)}"
        )
    num_tokens, num_experts = router_logits.shape
    if not 0 < top_k <= num_experts:
        raise ValueError(
            f"top-k {top_k} must be between 1 and the number of experts ({num_experts})"
        )
    if router_logits.stride(1) != 1:
        router_logits = router_logits.contiguous()
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=router_logits.device)
    if num_tokens:
        _route_top_k_kernel[(num_tokens,)](
            router_logits, weights, ids, num_experts, router_logits.stride(0),
            TOP_K=top_k, BLOCK_E=next_power_of_2(num_experts), BLOCK_K=next_power_of_2(top_k),
            RENORMALIZE=renormalize,
        )
    return weights, ids


def route_top_k(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing: the Triton kernel on CUDA, the torch reference elsewhere."""
    if use_triton(router_logits):
        return route_top_k_triton(router_logits, top_k, renormalize)
    return route_top_k_ref(router_logits, top_k, renormalize)
