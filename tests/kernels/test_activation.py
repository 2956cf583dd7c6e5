"""Triton SiLU-and-multiply against the torch reference."""

from __future__ import annotations

import pytest
import torch

from pagedserve.kernels.activation import silu_and_mul, silu_and_mul_ref, silu_and_mul_triton

ATOL = {torch.float32: 1e-6, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(5, 128), (2, 3, 2 * 1500), (1, 2 * 2048 + 2)])
def test_silu_and_mul_matches_reference(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 4).to(device, dtype)
    out = silu_and_mul_triton(x)
    ref = silu_and_mul_ref(x)
    assert out.shape == ref.shape and out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=1e-3 if dtype == torch.float16 else 1e-5, atol=ATOL[dtype])


def test_non_contiguous_input(device: torch.device) -> None:
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(1)).to(device)[::2]
    torch.testing.assert_close(silu_and_mul_triton(x), silu_and_mul_ref(x), rtol=1e-5, atol=1e-6)


def test_dispatch_off_cuda_is_reference() -> None:
    x = torch.randn(3, 64)
    assert torch.equal(silu_and_mul(x), silu_and_mul_ref(x))
