"""RMSNorm, optionally fused with the residual add that precedes it in every decoder layer."""

from __future__ import annotations

import torch

from pagedserve.kernels.triton_utils import next_power_of_2, tl, triton, use_triton

# One program normalises one row; a warp per this many columns keeps registers per thread low.
_COLUMNS_PER_WARP = 256
_MAX_WARPS = 16


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
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(residual_ptr + row * residual_row_stride + cols, mask=mask, other=0.0)
        # The sum is rounded to the activation dtype first: that is what the next layer reads.
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x.dtype)
        tl.store(summed_ptr + row * summed_row_stride + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    # As torch computes transformers' RMSNorm: the mean is the sum times 1/n, and rsqrt is the
    # hardware approximation. (The sum's order still differs from torch's reduction, so the
    # bf16 output can differ in a rare element; 1 / sqrt(sum / n) differed 2-8x more often.)
    inv_rms = tl.math.rsqrt(tl.sum(x32 * x32, axis=0) * inv_n_cols + eps)
    normed = (x32 * inv_rms).to(x.dtype).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


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
        block = next_power_of_2(hidden)
        num_warps = max(1, min(_MAX_WARPS, block // _COLUMNS_PER_WARP))
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
            1.0 / hidden,
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK=block,
            num_warps=num_warps,
            # Squares rounded before they are summed, as torch's pow-then-mean does (no FMA).
            enable_fp_fusion=False,
        )
    return out.view(x.shape), summed.view(x.shape) if summed is not None else None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton RMSNorm over the last dimension; same numerics as ``rms_norm_ref``."""
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
