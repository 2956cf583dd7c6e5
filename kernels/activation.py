"""SiLU-and-multiply of the fused gate/up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedserve.kernels.triton_utils import cdiv, next_power_of_2, tl, triton, use_triton

# Columns of the output one program writes; rows of 11008+ columns take a few programs each.
_SILU_BLOCK = 1024


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x is [..., 2 * d] = [gate | up]; returns silu(gate) * up, [..., d]."""
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, d, x_row_stride, out_row_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_row_stride + d + cols, mask=mask, other=0.0)
    # Round silu(gate) to the input dtype before the product, as the two torch ops do.
    act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
    out = act.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """Triton silu(gate) * up over the last dimension of x = [..., 2 * d]."""
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], d, dtype=x.dtype, device=x.device)
    if x2.shape[0] > 0 and d > 0:
        block = min(_SILU_BLOCK, next_power_of_2(d))
        grid = (x2.shape[0], cdiv(d, block))
        _silu_and_mul_kernel[grid](x2, out, d, x2.stride(0), out.stride(0), BLOCK=block)
    return out.view(*x.shape[:-1], d)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: the Triton kernel on CUDA, the torch reference elsewhere."""
    if use_triton(x):
        return silu_and_mul_triton(x)
    return silu_and_mul_ref(x)
