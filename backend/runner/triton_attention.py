"""The Triton attention backend: the CUDA path behind ``AttentionBackend``.

Only device tensors and the host bounds ``max_query_len`` / ``max_seq_len`` of the metadata
reach the kernels (never the ``*_cpu`` lists), so every launch size is fixed by shapes and those
bounds. For CUDA-graph capture the caller fixes the bounds for the graph (``max_query_len`` >=
every query length of any replay; ``max_seq_len``, which only picks the decode split count,
e.g. the model's max length) and replays with new tensor contents.
"""

from __future__ import annotations

import torch

from pagedserve.backend.runner.attention import AttentionMetadata
from pagedserve.kernels.kv_cache import write_kv_cache_triton
from pagedserve.kernels.paged_attention import (
    DEFAULT_ATTENTION_CONFIG,
    AttentionKernelConfig,
    paged_attention_triton,
)


class TritonAttentionBackend:
    """Writes the step's K/V with the slot-mapping kernel, then runs the paged attention kernels."""

    def __init__(self, config: AttentionKernelConfig = DEFAULT_ATTENTION_CONFIG) -> None:
        self.config = config

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        write_kv_cache_triton(k, v, kv_cache, metadata.slot_mapping)
        return paged_attention_triton(
            q,
            kv_cache,
            metadata.block_tables,
            metadata.query_start_loc,
            metadata.seq_lens,
            scale,
            max_query_len=metadata.max_query_len,
            max_seq_len=metadata.max_seq_len,
            num_kv_splits=metadata.num_kv_splits,
            config=self.config,
        )
