"""Mixture-of-experts MLP: every token through its top-k experts' gate/up, SiLU * up and down
projections, weighted by its routing weights and summed.

The torch reference loops over the experts that got tokens, as transformers does; it is the
CPU path and the oracle. The Triton path never leaves the device and has static shapes (no
host sync), so a decode step that runs it can be captured in a CUDA graph:

1. ``align_by_expert`` groups the ``T * top_k`` (token, expert) assignments by expert and pads
   each expert's run to a multiple of the GEMM's row block, so every row block belongs to one
   expert. The buffer is sized for the worst case (every hit expert needs a padding block), and
   blocks past the real end exit at once.
2. A grouped GEMM over those blocks computes gate and up of each assignment against its
   expert's ``w13`` slice and writes ``silu(gate) * up``.
3. A second grouped GEMM multiplies by the expert's ``w2`` and scales each row by its routing
   weight; a third kernel sums the ``top_k`` rows of each token in fp32 (the block's output).

Weights: ``w13`` is ``[experts, 2 * inter, hidden]`` (gate rows, then up rows), ``w2`` is
``[experts, hidden, inter]``; under tensor parallelism ``inter`` is this rank's share.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pagedserve.kernels.triton_utils import cdiv, next_power_of_2, tl, triton, use_triton

# tl.dot needs at least 16 rows, columns and reduction steps.
_MIN_DOT = 16


def fused_moe_ref(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """x [T, hidden]; topk_weights [T, k] (applied in their own dtype, then rounded to x's),
    topk_ids [T, k] -> [T, hidden].

    One pass per expert that got tokens, as transformers does; each weighted output lands in
    its token's slot and the k slots are summed at the end (with k = 2, transformers' two adds
    exactly). Slots rather than ``index_add_``, which on CPU costs ~100x more here.
    """
    num_tokens, top_k = topk_ids.shape
    slots = torch.zeros(num_tokens, top_k, x.shape[-1], dtype=x.dtype, device=x.device)
    inter = w2.shape[-1]
    for expert in torch.unique(topk_ids).tolist():
        token, slot = torch.where(topk_ids == expert)
        gate_up = F.linear(x[token], w13[expert])
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        down = F.linear(act, w2[expert]) * topk_weights[token, slot, None]
        slots[token, slot] = down.to(x.dtype)
    return slots.sum(dim=1)


@dataclass(frozen=True)
class MoETileConfig:
    """Tiles of both grouped GEMMs. ``block_m`` is also the padding unit of each expert's
    rows, so it is chosen with the alignment, per call, from the assignments per expert."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < _MIN_DOT or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= {_MIN_DOT}, got {value}")
        if self.group_m < 1:
            raise ValueError(f"group_m must be positive, got {self.group_m}")


# (largest mean assignments per expert, tiles), from tests/gpu/moe_tiles_bench.py on an H200 at
# Qwen3-30B-A3B's shapes (CUDA-graph replays): decode batches hit each expert with a few rows,
# so small row blocks waste little padding and the weights stream at ~90% of copy bandwidth;
# prefill chunks fill 128-row blocks and become compute-bound.
TILE_CONFIGS: tuple[tuple[float, MoETileConfig], ...] = (
    (8.0, MoETileConfig(block_m=16, block_n=64, block_k=128, group_m=1, num_warps=4)),
    (24.0, MoETileConfig(block_m=32, block_n=64, block_k=128, group_m=8, num_warps=4)),
    (64.0, MoETileConfig(block_m=64, block_n=64, block_k=64, group_m=8, num_warps=4)),
    (float("inf"), MoETileConfig(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=8)),
)


def choose_tile_config(num_assignments: int, num_experts: int) -> MoETileConfig:
    """The tiles for ``num_assignments`` (tokens x top_k) spread over ``num_experts``."""
    mean = num_assignments / max(1, num_experts)
    return next(config for limit, config in TILE_CONFIGS if mean <= limit)


@dataclass
class ExpertAlignment:
    """Assignments (flat indices ``token * top_k + slot``) grouped by expert, each expert's run
    padded to ``block_m`` with the sentinel ``num_assignments``.

    ``sorted_ids`` [capacity], ``block_expert`` [capacity / block_m] (the expert of each row
    block; blocks past the end repeat the last expert and are skipped), ``num_padded`` [1]
    (rows in use), all on the device.
    """

    sorted_ids: torch.Tensor
    block_expert: torch.Tensor
    num_padded: torch.Tensor
    num_assignments: int
    block_m: int


def align_capacity(num_assignments: int, num_experts: int, block_m: int) -> int:
    """Rows the aligned buffer needs at most: every assignment, plus a partial block for each
    expert that can be hit (no more than the assignments)."""
    hit = min(num_experts, num_assignments)
    return cdiv(num_assignments + hit * (block_m - 1), block_m) * block_m


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertAlignment:
    """Group the assignments by expert on the device, with static shapes and no host sync.

    Three small kernels in place of a sort: count each expert's assignments, lay out the
    padded runs (and each row block's expert), then place every assignment in its expert's
    run with an atomic cursor. Within a run the order is whatever the atomics give; that is
    safe because every row of the grouped GEMMs is computed on its own (bitwise the same in
    any row position), and each result is written back to its assignment's own row.
    """
    flat = topk_ids.reshape(-1)
    if flat.dtype != torch.int32:
        flat = flat.to(torch.int32)
    n = flat.numel()
    device = flat.device
    capacity = align_capacity(n, num_experts, block_m)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
    cursor = torch.empty(num_experts, dtype=torch.int32, device=device)
    sorted_ids = torch.empty(capacity, dtype=torch.int32, device=device)
    block_expert = torch.empty(capacity // block_m, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    grid = (max(1, cdiv(n, _ALIGN_BLOCK)),)
    _count_by_expert_kernel[grid](flat, counts, n, BLOCK=_ALIGN_BLOCK)
    _lay_out_runs_kernel[(1,)](
        counts, cursor, sorted_ids, block_expert, num_padded, n, num_experts, capacity,
        BLOCK_M=block_m, BLOCK_E=next_power_of_2(num_experts), CHUNK=_ALIGN_CHUNK,
    )
    _place_by_expert_kernel[grid](flat, cursor, sorted_ids, n, BLOCK=_ALIGN_BLOCK)
    return ExpertAlignment(sorted_ids, block_expert, num_padded, n, block_m)


# Assignments per program when counting and placing; rows (and row blocks) per step of the
# one-program layout kernel.
_ALIGN_BLOCK = 1024
_ALIGN_CHUNK = 256


@triton.jit
def _count_by_expert_kernel(ids_ptr, counts_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offsets < n
    expert = tl.load(ids_ptr + offsets, mask=valid, other=0)
    tl.atomic_add(counts_ptr + expert, 1, mask=valid)


@triton.jit
def _lay_out_runs_kernel(
    counts_ptr,
    cursor_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    num_padded_ptr,
    n,
    num_experts,
    capacity,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """One program: each expert's run start (the placing kernel's cursors), the rows in use,
    the sentinel in every row, and each row block's expert (the last one past the end)."""
    experts = tl.arange(0, BLOCK_E)
    real = experts < num_experts
    counts = tl.load(counts_ptr + experts, mask=real, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    run_end = tl.cumsum(padded, 0)
    tl.store(cursor_ptr + experts, run_end - padded, mask=real)
    tl.store(num_padded_ptr, tl.sum(padded, 0))
    for start in range(0, capacity, CHUNK):
        rows = start + tl.arange(0, CHUNK)
        tl.store(sorted_ids_ptr + rows, n, mask=rows < capacity)
    # A block's expert: how many runs end at or before the block's first row.
    run_end = tl.where(real, run_end, capacity + BLOCK_M)
    num_blocks = capacity // BLOCK_M
    for first in range(0, num_blocks, CHUNK):
        blocks = first + tl.arange(0, CHUNK)
        ended = run_end[None, :] <= (blocks * BLOCK_M)[:, None]
        expert = tl.minimum(tl.sum(ended.to(tl.int32), axis=1), num_experts - 1)
        tl.store(block_expert_ptr + blocks, expert, mask=blocks < num_blocks)


@triton.jit
def _place_by_expert_kernel(ids_ptr, cursor_ptr, sorted_ids_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offsets < n
    expert = tl.load(ids_ptr + offsets, mask=valid, other=0)
    row = tl.atomic_add(cursor_ptr + expert, 1, mask=valid)
    tl.store(sorted_ids_ptr + row, offsets, mask=valid)


@triton.jit
def _block_coordinates(num_row_blocks, n_cols, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of this program, grouped so neighbouring programs share
    weight tiles in L2."""
    pid = tl.program_id(0)
    num_col_blocks = tl.cdiv(n_cols, BLOCK_N)
    per_group = GROUP_M * num_col_blocks
    group = pid // per_group
    first_row_block = group * GROUP_M
    group_size = tl.minimum(num_row_blocks - first_row_block, GROUP_M)
    row_block = first_row_block + (pid % per_group) % group_size
    col_block = (pid % per_group) // group_size
    return row_block, col_block


@triton.jit
def _moe_gate_up_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    num_padded_ptr,
    num_assignments,
    num_row_blocks,
    inter,
    hidden,
    x_row_stride,
    w_expert_stride,
    w_row_stride,
    out_row_stride,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    row_block, col_block = _block_coordinates(num_row_blocks, inter, BLOCK_N, GROUP_M)
    if row_block * BLOCK_M >= tl.load(num_padded_ptr):
        return
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    assignment = tl.load(sorted_ids_ptr + rows).to(tl.int64)
    valid = assignment < num_assignments
    token = assignment // TOP_K
    expert = tl.load(block_expert_ptr + row_block).to(tl.int64)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < inter
    w_expert = w_ptr + expert * w_expert_stride
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < hidden
        a = tl.load(
            x_ptr + token[:, None] * x_row_stride + ks[None, :],
            mask=valid[:, None] & k_ok[None, :],
            other=0.0,
        )
        w_mask = k_ok[:, None] & col_ok[None, :]
        gate_w = tl.load(
            w_expert + cols[None, :] * w_row_stride + ks[:, None], mask=w_mask, other=0.0
        )
        up_w = tl.load(
            w_expert + (cols[None, :] + inter) * w_row_stride + ks[:, None], mask=w_mask, other=0.0
        )
        acc_gate = tl.dot(a, gate_w, acc_gate, input_precision="ieee")
        acc_up = tl.dot(a, up_w, acc_up, input_precision="ieee")
    # (fp32 weights multiply in full fp32, not TF32, so fp32 models match transformers.)
    # Round gate and up to the activation dtype, then silu(gate) too, as the torch ops do.
    dtype = out_ptr.dtype.element_ty
    gate = acc_gate.to(dtype).to(tl.float32)
    up = acc_up.to(dtype).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32) * up
    tl.store(
        out_ptr + assignment[:, None] * out_row_stride + cols[None, :],
        act.to(dtype),
        mask=valid[:, None] & col_ok[None, :],
    )


@triton.jit
def _moe_down_kernel(
    act_ptr,
    w_ptr,
    out_ptr,
    weights_ptr,
    sorted_ids_ptr,
    block_expert_ptr,
    num_padded_ptr,
    num_assignments,
    num_row_blocks,
    hidden,
    inter,
    act_row_stride,
    w_expert_stride,
    w_row_stride,
    out_row_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    row_block, col_block = _block_coordinates(num_row_blocks, hidden, BLOCK_N, GROUP_M)
    if row_block * BLOCK_M >= tl.load(num_padded_ptr):
        return
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    assignment = tl.load(sorted_ids_ptr + rows).to(tl.int64)
    valid = assignment < num_assignments
    expert = tl.load(block_expert_ptr + row_block).to(tl.int64)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < hidden
    w_expert = w_ptr + expert * w_expert_stride
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < inter
        a = tl.load(
            act_ptr + assignment[:, None] * act_row_stride + ks[None, :],
            mask=valid[:, None] & k_ok[None, :],
            other=0.0,
        )
        w = tl.load(
            w_expert + cols[None, :] * w_row_stride + ks[:, None],
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(a, w, acc, input_precision="ieee")
    # The torch order: the down projection rounded to the activation dtype, then weighted.
    dtype = out_ptr.dtype.element_ty
    weight = tl.load(weights_ptr + assignment, mask=valid, other=0.0).to(tl.float32)
    out = acc.to(dtype).to(tl.float32) * weight[:, None]
    tl.store(
        out_ptr + assignment[:, None] * out_row_stride + cols[None, :],
        out.to(dtype),
        mask=valid[:, None] & col_ok[None, :],
    )


def _check_shapes(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> None:
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(
            f"expected x [T, hidden], w13 and w2 3-D; got {tuple(x.shape)}, "
            f"{tuple(w13.shape)}, {tuple(w2.shape)}"
        )
    experts, two_inter, hidden = w13.shape
    if x.shape[1] != hidden or two_inter % 2 or tuple(w2.shape) != (experts, hidden, two_inter // 2):
        raise ValueError(
            f"shapes do not fit: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}"
        )
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"routing shapes do not fit {x.shape[0]} tokens: weights {tuple(topk_weights.shape)}, "
            f"ids {tuple(topk_ids.shape)}"
        )
    if x.dtype != w13.dtype or x.dtype != w2.dtype:
        raise ValueError(f"dtypes differ: x {x.dtype}, w13 {w13.dtype}, w2 {w2.dtype}")


def fused_moe_triton(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    config: MoETileConfig | None = None,
) -> torch.Tensor:
    """The Triton MoE MLP (see the module docstring); same arguments as ``fused_moe_ref``."""
    _check_shapes(x, w13, w2, topk_weights, topk_ids)
    num_tokens, top_k = topk_ids.shape
    experts, two_inter, hidden = w13.shape
    inter = two_inter // 2
    n = num_tokens * top_k
    if n == 0:
        return torch.zeros_like(x)
    if config is None:
        config = choose_tile_config(n, experts)
    x = x.contiguous()
    w13 = w13.contiguous()
    w2 = w2.contiguous()
    alignment = align_by_expert(topk_ids, experts, config.block_m)
    row_blocks = alignment.block_expert.numel()
    act = torch.empty(n, inter, dtype=x.dtype, device=x.device)
    common = dict(
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        GROUP_M=config.group_m,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    _moe_gate_up_kernel[(row_blocks * cdiv(inter, config.block_n),)](
        x, w13, act, alignment.sorted_ids, alignment.block_expert, alignment.num_padded,
        n, row_blocks, inter, hidden, x.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
        TOP_K=top_k, **common,
    )
    weighted = torch.empty(n, hidden, dtype=x.dtype, device=x.device)
    weights = topk_weights.reshape(-1).contiguous()
    _moe_down_kernel[(row_blocks * cdiv(hidden, config.block_n),)](
        act, w2, weighted, weights, alignment.sorted_ids, alignment.block_expert,
        alignment.num_padded, n, row_blocks, hidden, inter, act.stride(0), w2.stride(0),
        w2.stride(1), weighted.stride(0), **common,
    )
    out = torch.empty_like(x)
    _sum_top_k_kernel[(num_tokens, cdiv(hidden, _SUM_BLOCK))](
        weighted, out, hidden, TOP_K=top_k, BLOCK=_SUM_BLOCK
    )
    return out


_SUM_BLOCK = 1024


@triton.jit
def _sum_top_k_kernel(weighted_ptr, out_ptr, hidden, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    """out[t] = sum over the k slots of weighted[t * k + slot], in fp32 (slot order)."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < hidden
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for slot in tl.static_range(TOP_K):
        row = weighted_ptr + (token * TOP_K + slot) * hidden
        acc += tl.load(row + cols, mask=valid, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * hidden + cols, acc.to(out_ptr.dtype.element_ty), mask=valid)


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """The MoE MLP: the Triton kernels on CUDA, the torch reference elsewhere."""
    if use_triton(x):
        return fused_moe_triton(x, w13, w2, topk_weights, topk_ids)
    return fused_moe_ref(x, w13, w2, topk_weights, topk_ids)
