"""The Triton attention backend: the CUDA path behind ``AttentionBackend``, with the hooks that
let a decode step run inside a CUDA graph.

Only device tensors and the host bounds ``max_query_len`` / ``max_seq_len`` of the metadata
reach the kernels (never the ``*_cpu`` lists), so every launch size is fixed by shapes and those
bounds. The graph hooks own the static metadata buffers a captured graph reads: capture takes
views of them (query length 1, the model's max length as the bound, a pinned split count) and
every replay first copies the step's metadata into them, so the backend alone knows what its
kernels need from a graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedserve.backend.runner.attention import AttentionMetadata
from pagedserve.kernels.kv_cache import write_kv_cache_triton
from pagedserve.kernels.paged_attention import (
    DEFAULT_ATTENTION_CONFIG,
    AttentionKernelConfig,
    paged_attention_triton,
)


@dataclass
class _GraphBuffers:
    """Static decode metadata for the largest captured batch; smaller graphs use prefixes."""

    slot_mapping: torch.Tensor  # [max_batch] int64, -1 on padding rows (nothing is written)
    query_start_loc: torch.Tensor  # [max_batch + 1] int32, 0..max_batch (one token each)
    seq_lens: torch.Tensor  # [max_batch] int32, 1 on padding rows
    block_tables: torch.Tensor  # [max_batch, max_blocks] int32
    max_seq_len: int


class TritonAttentionBackend:
    """Writes the step's K/V with the slot-mapping kernel, then runs the paged attention kernels."""

    def __init__(self, config: AttentionKernelConfig = DEFAULT_ATTENTION_CONFIG) -> None:
        self.config = config
        self._graph: _GraphBuffers | None = None

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

    # -- CUDA-graph hooks ----------------------------------------------------------------------
    def init_graph_buffers(
        self, max_batch: int, max_blocks: int, max_seq_len: int, device: torch.device
    ) -> None:
        self._graph = _GraphBuffers(
            slot_mapping=torch.full((max_batch,), -1, dtype=torch.int64, device=device),
            query_start_loc=torch.arange(max_batch + 1, dtype=torch.int32, device=device),
            seq_lens=torch.ones(max_batch, dtype=torch.int32, device=device),
            block_tables=torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device),
            max_seq_len=max_seq_len,
        )

    def _buffers(self) -> _GraphBuffers:
        if self._graph is None:
            raise RuntimeError("init_graph_buffers must run before graph capture or replay")
        return self._graph

    def graph_metadata(self, batch_size: int, num_kv_splits: int) -> AttentionMetadata:
        """The metadata a graph of ``batch_size`` decodes is captured with."""
        g = self._buffers()
        return AttentionMetadata(
            slot_mapping=g.slot_mapping[:batch_size],
            query_start_loc=g.query_start_loc[: batch_size + 1],
            seq_lens=g.seq_lens[:batch_size],
            block_tables=g.block_tables[:batch_size],
            max_query_len=1,
            max_seq_len=g.max_seq_len,
            query_lens_cpu=[1] * batch_size,
            seq_lens_cpu=[1] * batch_size,
            num_kv_splits=num_kv_splits,
        )

    def graph_fits(self, metadata: AttentionMetadata) -> bool:
        g = self._graph
        return (
            g is not None
            and metadata.max_query_len == 1
            and metadata.num_seqs <= g.seq_lens.shape[0]
            and metadata.block_tables.shape[1] <= g.block_tables.shape[1]
        )

    def prepare_replay(self, metadata: AttentionMetadata, batch_size: int) -> None:
        """Copy a decode step's metadata into the buffers of the graph of ``batch_size``
        (>= its sequences); the padding rows write nothing and attend to one slot."""
        g = self._buffers()
        n = metadata.num_seqs
        g.slot_mapping[:n].copy_(metadata.slot_mapping, non_blocking=True)
        g.slot_mapping[n:batch_size].fill_(-1)
        g.seq_lens[:n].copy_(metadata.seq_lens, non_blocking=True)
        g.seq_lens[n:batch_size].fill_(1)
        width = metadata.block_tables.shape[1]
        g.block_tables[:n, :width].copy_(metadata.block_tables, non_blocking=True)
