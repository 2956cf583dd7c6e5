"""Engine configuration helpers."""

from __future__ import annotations

import pytest

from pagedserve.backend.config import EngineConfig


def test_engines_sharing_a_gpu_split_the_memory_cap_evenly() -> None:
    config = EngineConfig.from_kwargs(gpu_memory_utilization=0.9, max_num_seqs=7)
    shares = [config.sharing_device(i, 3).cache.gpu_memory_utilization for i in range(3)]
    # Each cap counts the engines loaded before it: 0.3, then 0.6, then the whole 0.9.
    assert shares == pytest.approx([0.3, 0.6, 0.9])
    assert config.sharing_device(0, 3).scheduler.max_num_seqs == 7
    assert config.cache.gpu_memory_utilization == 0.9  # the original is untouched
    with pytest.raises(ValueError):
        config.sharing_device(3, 3)
