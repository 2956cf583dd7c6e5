"""Triton RMSNorm and fused residual-add + RMSNorm against the torch references."""

from __future__ import annotations

import pytest
import torch

from pagedserve.kernels.rmsnorm import (
    fused_add_rms_norm,
    fused_add_rms_norm_ref,
    fused_add_rms_norm_triton,
    rms_norm,
    rms_norm_ref,
    rms_norm_triton,
)

# (rtol, atol). fp32: reduction order only. fp16: the normalised value's rounding and then the
# product's may each differ by one ulp (2 ulp <= 2e-3 relative).
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 1e-5)}
EPS = 1e-5


def _inputs(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, weight_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=gen) * 3).to(device, dtype)
    residual = torch.randn(shape, generator=gen).to(device, dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(device, weight_dtype or dtype)
    return x, residual, weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(7, 64), (2, 3, 1000), (1, 4096)])
def test_rms_norm_matches_reference(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    x, _, weight = _inputs(shape, dtype, device)
    out = rms_norm_triton(x, weight, EPS)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, rms_norm_ref(x, weight, EPS), rtol=TOL[dtype][0], atol=TOL[dtype][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(7, 64), (5, 1000)])
def test_fused_add_rms_norm_matches_reference(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> None:
    x, residual, weight = _inputs(shape, dtype, device)
    out, summed = fused_add_rms_norm_triton(x, residual, weight, EPS)
    ref_out, ref_summed = fused_add_rms_norm_ref(x, residual, weight, EPS)
    assert torch.equal(summed, ref_summed)  # one rounded add: exact
    torch.testing.assert_close(out, ref_out, rtol=TOL[dtype][0], atol=TOL[dtype][1])


def test_fp32_weight_promotes_like_torch(device: torch.device) -> None:
    x, _, weight = _inputs((3, 256), torch.float16, device, weight_dtype=torch.float32)
    out = rms_norm_triton(x, weight, EPS)
    ref = rms_norm_ref(x, weight, EPS)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=TOL[torch.float16][0], atol=TOL[torch.float16][1])


def test_non_contiguous_rows(device: torch.device) -> None:
    x, _, weight = _inputs((6, 128), torch.float32, device)
    view = x[::2]
    torch.testing.assert_close(rms_norm_triton(view, weight, EPS), rms_norm_ref(view, weight, EPS), rtol=0, atol=1e-5)


def test_dispatch_off_cuda_is_reference() -> None:
    x, residual, weight = _inputs((3, 64), torch.float32, torch.device("cpu"))
    assert torch.equal(rms_norm(x, weight, EPS), rms_norm_ref(x, weight, EPS))
    for got, want in zip(fused_add_rms_norm(x, residual, weight, EPS), fused_add_rms_norm_ref(x, residual, weight, EPS)):
        assert torch.equal(got, want)


def test_wrong_weight_shape_raises(device: torch.device) -> None:
    x, residual, weight = _inputs((2, 64), torch.float32, device)
    with pytest.raises(ValueError, match="hidden size"):
        rms_norm_triton(x, weight[:32], EPS)
    with pytest.raises(ValueError, match="residual"):
        fused_add_rms_norm_triton(x, residual[:1], weight, EPS)
