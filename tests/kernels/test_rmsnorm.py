"""Triton RMSNorm and fused residual-add + RMSNorm against the torch references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pagedserve.kernels.rmsnorm import (
    TorchMeanSplit,
    fused_add_rms_norm,
    fused_add_rms_norm_ref,
    fused_add_rms_norm_triton,
    rms_norm,
    rms_norm_ref,
    rms_norm_triton,
    torch_mean_split,
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


def _cuda_mean_order_sum(squares: np.ndarray, split: TorchMeanSplit) -> np.float32:
    """One row's sum of squares in the order torch's CUDA mean adds them, one fp32 add at a
    time: thread t's four accumulators take its values in turn (runs of four adjacent values
    when vectorized, else every threads-th value) and combine in order; lane l then meets lane
    l + lanes/2 and so on within each warp, and last the warps meet the same way."""
    n, threads = len(squares), split.threads
    sums = []
    for thread in range(threads):
        acc = [np.float32(0.0)] * 4
        if split.vectorized:
            run = thread
            while run * 4 + 3 < n:
                for i in range(4):
                    acc[i] = np.float32(acc[i] + squares[run * 4 + i])
                run += threads
        else:
            for offset, col in enumerate(range(thread, n, threads)):
                acc[offset % 4] = np.float32(acc[offset % 4] + squares[col])
        sums.append(np.float32(np.float32(np.float32(acc[0] + acc[1]) + acc[2]) + acc[3]))

    def halve(values: list[np.float32]) -> np.float32:
        while len(values) > 1:
            half = len(values) // 2
            values = [np.float32(values[i] + values[i + half]) for i in range(half)]
        return values[0]

    return halve([halve(sums[w * split.lanes:(w + 1) * split.lanes]) for w in range(split.warps)])


def _normalise(row: np.ndarray, order_sum: np.float32) -> np.ndarray:
    """fp32 RMSNorm of one row from its sum of squares, rsqrt as 1 / sqrt (the interpreter's)."""
    mean = np.float32(order_sum * (np.float32(1.0) / np.float32(len(row))))
    return row * (np.float32(1.0) / np.sqrt(np.float32(mean + np.float32(EPS))))


@pytest.mark.parametrize("rows,cols", [(3, 1000), (40, 576), (1, 2048), (12, 120), (20, 96), (3, 8192), (40, 8192)])
def test_variance_sums_in_torch_cuda_order(rows: int, cols: int, device: torch.device) -> None:
    """The kernel sums the squares in torch's CUDA order, the one transformers' bf16 model runs,
    so its outputs equal torch's bit for bit: on the device, torch itself is the reference; under
    the interpreter, the order written out one add at a time. Magnitudes spread over 2^±12 make
    any other order round differently in some rows (checked, so the test can fail)."""
    gen = torch.Generator().manual_seed(rows * cols)
    x = torch.randn(rows, cols, generator=gen) * torch.exp2(torch.rand(rows, cols, generator=gen) * 24 - 12)
    out = rms_norm_triton(x.to(device), torch.ones(cols, device=device), EPS)
    if device.type == "cuda":
        assert torch.equal(out, rms_norm_ref(x.to(device), torch.ones(cols, device=device), EPS))
        return
    split = torch_mean_split(rows, cols)
    rows_np = x.numpy()
    expected = np.stack([_normalise(r, _cuda_mean_order_sum(r * r, split)) for r in rows_np])
    sequential = np.stack([_normalise(r, np.cumsum(r * r, dtype=np.float32)[-1]) for r in rows_np])
    assert not np.array_equal(expected, sequential)
    assert np.array_equal(out.numpy(), expected)


def test_torch_mean_split_follows_the_row_count() -> None:
    """Fewer rows give each row more threads, up to 512 a block; rows of 8192 are also split
    across warps."""
    assert torch_mean_split(1, 576) == TorchMeanSplit(128, 1, True)
    assert torch_mean_split(16, 576) == TorchMeanSplit(32, 1, True)
    assert torch_mean_split(1, 2048) == TorchMeanSplit(512, 1, True)
    assert torch_mean_split(4, 2048) == TorchMeanSplit(128, 1, True)
    assert torch_mean_split(1000, 4096) == TorchMeanSplit(32, 1, True)
    assert torch_mean_split(3, 8192) == TorchMeanSplit(256, 2, True)
    assert torch_mean_split(1000, 8192) == TorchMeanSplit(32, 16, True)
    assert torch_mean_split(7, 64) == TorchMeanSplit(64, 1, False)
