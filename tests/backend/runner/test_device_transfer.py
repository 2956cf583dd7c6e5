"""Several host arrays to the device in one copy: same values, shapes and dtypes as one copy each."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pagedserve.backend.runner.batch import arrays_to_device, pack_arrays

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_arrays_arrive_with_their_values_shapes_and_dtypes(device: str) -> None:
    rng = np.random.default_rng(0)
    arrays = [
        rng.integers(0, 1 << 40, size=7, dtype=np.int64),
        rng.integers(-(1 << 31), (1 << 31) - 1, size=(3, 5), dtype=np.int32),
        np.zeros(0, dtype=np.int64),  # an empty one (a step that samples nothing)
        rng.integers(0, 1000, size=(2, 1), dtype=np.int32),
    ]
    out = arrays_to_device(arrays, torch.device(device))
    assert len(out) == len(arrays)
    for host, dev in zip(arrays, out):
        assert dev.device.type == device
        assert dev.dtype == torch.from_numpy(host).dtype
        assert tuple(dev.shape) == host.shape
        assert np.array_equal(dev.cpu().numpy(), host)


def test_packed_arrays_each_start_16_byte_aligned() -> None:
    """Slices of the packed buffer reach Triton kernels as pointers; a start whose alignment
    varied with the step's sizes would compile a second variant of those kernels."""
    rng = np.random.default_rng(1)
    for _ in range(50):
        arrays = [rng.integers(0, 1 << 30, size=int(n), dtype=np.int64) for n in rng.integers(0, 9, size=5)]
        packed, starts = pack_arrays(arrays)
        assert packed.dtype == np.int64
        for a, start in zip(arrays, starts):
            assert (start * packed.itemsize) % 16 == 0
            assert np.array_equal(packed[start : start + a.size], a)
