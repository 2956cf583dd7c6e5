"""The forward context: the step's metadata and KV caches exist only inside
``forward_context``, and nested steps restore the outer one."""

from __future__ import annotations

import pytest
import torch

from pagedserve.backend.runner.attention import (
    AttentionMetadata,
    ForwardContext,
    forward_context,
    get_forward_context,
)


def test_context_exists_only_inside_a_step() -> None:
    with pytest.raises(RuntimeError, match="no forward context"):
        get_forward_context()
    outer_meta = AttentionMetadata.single_prefill(3, block_size=4, device="cpu")
    inner_meta = AttentionMetadata.single_prefill(5, block_size=4, device="cpu")
    outer_caches, inner_caches = [torch.zeros(1)], [torch.zeros(1)]
    with forward_context(outer_meta, outer_caches) as outer:
        assert outer == ForwardContext(outer_meta, outer_caches)
        assert get_forward_context() is outer
        with forward_context(inner_meta, inner_caches) as inner:
            assert get_forward_context() is inner
            assert inner.metadata is inner_meta and inner.kv_caches is inner_caches
        assert get_forward_context() is outer  # the inner step ended, the outer one goes on
    with pytest.raises(RuntimeError, match="no forward context"):
        get_forward_context()
