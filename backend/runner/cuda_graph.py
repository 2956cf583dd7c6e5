"""CUDA graphs for pure-decode steps.

A decode step of a small model is dominated by kernel-launch overhead: hundreds of small
launches per token. We capture the model's forward once per padded batch size and replay it;
each replay only copies the step's inputs into static buffers. The attention kernels size
their grids from shapes and host bounds alone, so the bounds fixed at capture (query length 1,
the model's max length, a pinned split count) stay valid for every replay.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pagedserve.backend.runner.attention import AttentionMetadata, forward_context


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_num_seqs (padding waste stays < 16)."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 16))
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        kv_splits_for: Callable[[int], int],
    ) -> None:
        """``kv_splits_for(batch_size)`` pins the decode kernel's context split count per graph."""
        self.model = model
        self.kv_caches = kv_caches
        self.max_model_len = max_model_len
        self.kv_splits_for = kv_splits_for
        self.sizes = capture_sizes(max_num_seqs)
        device = kv_caches[0].device
        n = self.sizes[-1]
        self.max_blocks = -(-max_model_len // block_size)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            max_query_len=1,
            max_seq_len=self.max_model_len,
            query_lens_cpu=[1] * size,
            seq_lens_cpu=[1] * size,
            num_kv_splits=self.kv_splits_for(size),
        )

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):  # largest first, so smaller ones reuse its pool
            metadata = self._metadata(size)
            args = (self.input_ids[:size], self.positions[:size])
            with forward_context(metadata, self.kv_caches):
                for _ in range(2):  # warm up: compile kernels, settle allocations
                    self.model(*args)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[size] = self.model(*args)
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def release(self) -> None:
        """Destroy the captured graphs. NCCL counts every live graph that captured one of its
        collectives and will not finish destroying or aborting the communicator until each is
        gone: tensor-parallel ranks call this before they leave the process group."""
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.outputs.clear()

    def fits(self, metadata: AttentionMetadata) -> bool:
        return (
            metadata.max_query_len == 1
            and metadata.num_seqs <= self.sizes[-1]
            and metadata.block_tables.shape[1] <= self.max_blocks
        )

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        n = metadata.num_seqs
        size = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(metadata.slot_mapping, non_blocking=True)
        self.slot_mapping[n:size].fill_(-1)  # padding rows write nothing
        self.seq_lens[:n].copy_(metadata.seq_lens, non_blocking=True)
        self.seq_lens[n:size].fill_(1)
        width = metadata.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(metadata.block_tables, non_blocking=True)
        self.graphs[size].replay()
        return self.outputs[size][:n]
