"""RMSNorm, optionally fused with the residual add that precedes it in every decoder layer."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from pagedserve.kernels.triton_utils import cdiv, next_power_of_2, tl, triton, use_triton


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalise in fp32, cast back, then scale (the order transformers' Llama uses)."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual)."""
    summed = x + residual
    return rms_norm_ref(summed, weight, eps), summed


# How torch's CUDA mean sums a contiguous last dimension (ATen's Reduce.cuh, as torch 2.11 builds
# it for CUDA): each thread keeps four accumulators, then the threads' sums meet in halving
# trees, first among the threads of a warp row, then across warps where a wide row is split
# between warps. Summing in that order makes the fp32 variance, and so the bf16 output, equal
# transformers' RMSNorm bit for bit.
_ACCUMULATORS = 4
_MAX_REDUCE_THREADS = 512
_WARP = 32
_COLUMNS_PER_WARP = 256
_MAX_WARPS = 16
_MIN_VECTORIZED_COLUMNS = 128
# A row is split across warps too once each thread would otherwise sum at least
# min(16 x warp rows, 256) values.
_SPLIT_VALUES_PER_WARP_ROW = 16
_SPLIT_VALUES_CAP = 256


def _last_pow2(n: int) -> int:
    return max(1, 1 << (n.bit_length() - 1))


@dataclass(frozen=True)
class TorchMeanSplit:
    """How torch's CUDA mean splits one row of ``n_cols`` contiguous fp32 values: ``lanes``
    threads side by side, times ``warps`` when a wide row is also split across warps (thread
    ``lane + lanes * warp`` reads value run ``lane + lanes * warp`` and every ``lanes * warps``-th
    after it); ``vectorized``: each run is four adjacent values, else one value."""

    lanes: int
    warps: int
    vectorized: bool

    @property
    def threads(self) -> int:
        return self.lanes * self.warps


@lru_cache(maxsize=4096)
def torch_mean_split(n_rows: int, n_cols: int) -> TorchMeanSplit:
    """Mirrors ATen's ``setReduceConfig`` for a tensor of ``n_rows`` rows: narrow rows share a
    block with other rows, so fewer rows give each row more threads."""
    vectorized = n_cols >= _MIN_VECTORIZED_COLUMNS
    dim0 = n_cols // _ACCUMULATORS if vectorized else n_cols
    dim0_pow2 = _last_pow2(dim0) if dim0 < _MAX_REDUCE_THREADS else _MAX_REDUCE_THREADS
    dim1_pow2 = _last_pow2(n_rows) if n_rows < _MAX_REDUCE_THREADS else _MAX_REDUCE_THREADS
    width = min(dim0_pow2, _WARP)
    height = min(dim1_pow2, _MAX_REDUCE_THREADS // width)
    width = min(dim0_pow2, _MAX_REDUCE_THREADS // height)
    values_per_thread = -(-n_cols // width)
    split_across_warps = values_per_thread >= min(height * _SPLIT_VALUES_PER_WARP_ROW, _SPLIT_VALUES_CAP)
    return TorchMeanSplit(width, height if split_across_warps else 1, vectorized)


@triton.jit
def _chunk_columns(k, thread, slot, THREADS: tl.constexpr, VECTORIZED: tl.constexpr):
    """Columns that chunk ``k`` gives each thread's four accumulators (the k-th value of each)."""
    if VECTORIZED:
        return (k * THREADS + thread) * 4 + slot
    return (k * 4 + slot) * THREADS + thread


@triton.jit
def _load_row_chunk(x_ptr, residual_ptr, offsets, mask, HAS_RESIDUAL: tl.constexpr):
    """The activation-dtype input at ``offsets``: x, or x + residual rounded to x's dtype (what
    the next layer reads)."""
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(residual_ptr + offsets, mask=mask, other=0.0)
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    summed_ptr,
    n_cols,
    x_row_stride,
    residual_row_stride,
    out_row_stride,
    summed_row_stride,
    inv_n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    LANES: tl.constexpr,
    WARPS: tl.constexpr,
    VECTORIZED: tl.constexpr,
    CHUNKS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    res_row = residual_ptr + row * residual_row_stride
    THREADS: tl.constexpr = LANES * WARPS
    thread = tl.arange(0, THREADS)[:, None]
    slot = tl.arange(0, 4)[None, :]

    # Sum of squares in torch's order: each chunk adds the next value to every accumulator.
    acc = tl.zeros((THREADS, 4), dtype=tl.float32)
    for k in tl.static_range(CHUNKS):
        cols = _chunk_columns(k, thread, slot, THREADS, VECTORIZED)
        xk = _load_row_chunk(x_row, res_row, cols, cols < n_cols, HAS_RESIDUAL).to(tl.float32)
        acc += xk * xk
    # A thread's accumulators combine in order (((a0 + a1) + a2) + a3); then lane l meets lane
    # l + lanes/2, ..., and last the warps the same way.
    even, odd = tl.split(tl.reshape(acc, (THREADS, 2, 2)))
    a0, a2 = tl.split(even)
    a1, a3 = tl.split(odd)
    total = tl.reshape(((a0 + a1) + a2) + a3, (WARPS, LANES))
    for _ in tl.static_range(LANES.bit_length() - 1):
        total = tl.sum(tl.reshape(total, (WARPS, 2, total.shape[1] // 2)), axis=1)
    total = tl.reshape(total, (WARPS,))
    for _ in tl.static_range(WARPS.bit_length() - 1):
        total = tl.sum(tl.reshape(total, (2, total.shape[0] // 2)), axis=0)
    # As torch computes transformers' RMSNorm: the mean is the sum times 1/n, and rsqrt is the
    # hardware approximation.
    inv_rms = tl.math.rsqrt(tl.sum(total, axis=0) * inv_n_cols + eps)

    # Elementwise from here, so the whole row at once (its chunks were just read).
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = _load_row_chunk(x_row, res_row, cols, mask, HAS_RESIDUAL)
    if HAS_RESIDUAL:
        tl.store(summed_ptr + row * summed_row_stride + cols, x, mask=mask)
    normed = (x.to(tl.float32) * inv_rms).to(x.dtype).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


@lru_cache(maxsize=64)
def _reciprocal_fp32(n: int) -> float:
    """1/n rounded once to fp32, the factor torch's mean multiplies the sum by (a Python
    ``1.0 / n`` would be rounded twice, to double and then to the kernel's fp32 argument)."""
    return float(torch.tensor(1.0, dtype=torch.float32) / n)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {hidden}")
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    res2 = _rows(residual) if residual is not None else None
    summed = torch.empty_like(x2) if residual is not None else None
    if x2.shape[0] > 0:
        split = torch_mean_split(x2.shape[0], hidden)
        block = next_power_of_2(hidden)
        _rms_norm_kernel[(x2.shape[0],)](
            x2,
            res2 if res2 is not None else x2,
            weight.contiguous(),
            out,
            summed if summed is not None else out,
            hidden,
            x2.stride(0),
            res2.stride(0) if res2 is not None else 0,
            out.stride(0),
            summed.stride(0) if summed is not None else 0,
            _reciprocal_fp32(hidden),
            eps,
            HAS_RESIDUAL=residual is not None,
            LANES=split.lanes,
            WARPS=split.warps,
            VECTORIZED=split.vectorized,
            CHUNKS=cdiv(hidden, _ACCUMULATORS * split.threads),
            BLOCK=block,
            # The sum's order is written out op by op, so any layout computes the same bits:
            # a warp per 256 columns loads the row wide, and at least a warp per 32 of torch's
            # threads.
            num_warps=max(1, split.threads // _WARP, min(_MAX_WARPS, block // _COLUMNS_PER_WARP)),
            # Squares rounded before they are summed, as torch's pow-then-mean does (no FMA).
            enable_fp_fusion=False,
        )
    return out.view(x.shape), summed.view(x.shape) if summed is not None else None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton RMSNorm over the last dimension; same numerics as ``rms_norm_ref`` (on CUDA, the
    same bits)."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton (rms_norm(x + residual), x + residual) in one pass over the row."""
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError("residual must match x in shape and dtype")
    out, summed = _launch(x, residual, weight, eps)
    assert summed is not None
    return out, summed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm: the Triton kernel on CUDA, the torch reference elsewhere."""
    if use_triton(x):
        return rms_norm_triton(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): Triton on CUDA, the torch reference elsewhere."""
    if use_triton(x):
        return fused_add_rms_norm_triton(x, residual, weight, eps)
    return fused_add_rms_norm_ref(x, residual, weight, eps)
