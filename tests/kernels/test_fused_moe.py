"""The fused MoE kernels against the torch reference, and the reference against a direct
per-token sum.

Runs on CUDA when there is one, else under Triton's interpreter (fp32 and fp16: bf16 tl.dot is
broken there; tests/gpu/test_kernels_gpu.py covers bf16 on the device). Routing is random with
some experts left empty and, in other cases, every expert hit.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedserve.kernels.fused_moe import (
    MoETileConfig,
    align_by_expert,
    align_capacity,
    choose_tile_config,
    fused_moe,
    fused_moe_ref,
    fused_moe_triton,
)

TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3)}
SMALL_TILES = MoETileConfig(block_m=16, block_n=32, block_k=32, group_m=2)


def make_case(
    tokens: int,
    hidden: int,
    inter: int,
    experts: int,
    top_k: int,
    dtype: torch.dtype,
    device: torch.device,
    empty: tuple[int, ...] = (),
    seed: int = 0,
) -> tuple[torch.Tensor, ...]:
    """Random activations, weights and softmax routing; experts in ``empty`` get no token."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) * hidden**-0.5
    w2 = torch.randn(experts, hidden, inter, generator=gen) * inter**-0.5
    logits = torch.randn(tokens, experts, generator=gen) * 2
    logits[:, list(empty)] = float("-inf")
    weights, ids = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
    return (
        x.to(device, dtype),
        w13.to(device, dtype),
        w2.to(device, dtype),
        weights.to(device),
        ids.to(device),
    )


def per_token_sum(x, w13, w2, weights, ids):  # type: ignore[no-untyped-def]
    """The definition, one token and one expert at a time, in fp32."""
    inter = w2.shape[-1]
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = F.linear(x[t].float(), w13[e].float())
            act = F.silu(h[:inter]) * h[inter:]
            out[t] += weights[t, j].float() * F.linear(act, w2[e].float())
    return out


def test_reference_is_the_per_token_sum() -> None:
    case = make_case(9, 32, 24, 8, 2, torch.float32, torch.device("cpu"), empty=(5,))
    torch.testing.assert_close(fused_moe_ref(*case), per_token_sum(*case), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "tokens,experts,top_k,empty,dtype",
    [
        (1, 8, 2, (), torch.float32),  # a decode step of one token: 2 experts hit, 6 empty
        # Ragged runs, three empty experts (the first and the last among them).
        (37, 8, 2, (0, 3, 7), torch.float32),
        (37, 8, 2, (0, 3, 7), torch.float16),
        (12, 8, 8, (), torch.float16),  # top-k = all experts: every expert hit by every token
        (3, 16, 4, (2,), torch.float32),  # more experts than the assignments can reach
    ],
)
def test_triton_matches_reference(
    tokens: int,
    experts: int,
    top_k: int,
    empty: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    # hidden 48 and inter 40: neither a multiple of the 32-wide tiles (masked edges).
    case = make_case(tokens, 48, 40, experts, top_k, dtype, device, empty)
    ids = case[4]
    hit = set(ids.flatten().tolist())
    assert hit.isdisjoint(empty)
    if top_k == experts:
        assert hit == set(range(experts))
    out = fused_moe_triton(*case, config=SMALL_TILES)
    ref = fused_moe_ref(*case)
    assert out.shape == ref.shape and out.dtype == dtype
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol)


def test_alignment_groups_and_pads_by_expert(device: torch.device) -> None:
    ids = torch.tensor([[3, 0], [3, 1], [0, 3], [1, 2]], device=device)
    alignment = align_by_expert(ids, num_experts=5, block_m=4)
    n = ids.numel()
    rows = alignment.sorted_ids.tolist()
    # Expert 0: assignments 1, 4; expert 1: 3, 6; expert 2: 7; expert 3: 0, 2, 5; expert 4: none.
    # Within a run the order is free; the padding follows the run.
    runs = [rows[i : i + 4] for i in range(0, 16, 4)]
    assert [sorted(run[:k]) for run, k in zip(runs, (2, 2, 1, 3))] == [[1, 4], [3, 6], [7], [0, 2, 5]]
    assert [run[k:] for run, k in zip(runs, (2, 2, 1, 3))] == [[n, n], [n, n], [n, n, n], [n]]
    assert all(i == n for i in rows[16:])
    assert len(rows) == align_capacity(n, 5, 4)
    assert alignment.block_expert.tolist()[:4] == [0, 1, 2, 3]
    assert int(alignment.num_padded) == 16


def test_empty_batch_and_bad_shapes(device: torch.device) -> None:
    x, w13, w2, weights, ids = make_case(3, 32, 16, 4, 2, torch.float32, device)
    assert fused_moe_triton(x[:0], w13, w2, weights[:0], ids[:0]).shape == (0, 32)
    with pytest.raises(ValueError, match="shapes do not fit"):
        fused_moe_triton(x, w13, w2[:, :, :8], weights, ids)
    with pytest.raises(ValueError, match="routing shapes"):
        fused_moe_triton(x, w13, w2, weights[:2], ids[:2])
    with pytest.raises(ValueError, match="power of two"):
        MoETileConfig(block_m=24, block_n=32, block_k=32)


def test_tile_choice_grows_with_tokens_per_expert() -> None:
    assert choose_tile_config(8 * 1, 128).block_m == 16  # one decode token, top-8 of 128
    assert choose_tile_config(256 * 8, 128).block_m == 32  # a decode batch of 256
    assert choose_tile_config(16384 * 8, 128).block_m == 128  # a full prefill chunk


def test_dispatch_off_cuda_is_reference() -> None:
    case = make_case(9, 32, 16, 4, 2, torch.float32, torch.device("cpu"))
    assert torch.equal(fused_moe(*case), fused_moe_ref(*case))
