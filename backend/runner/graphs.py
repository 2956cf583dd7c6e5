"""CUDA graphs for pure-decode steps: capture once per padded batch size, replay per step.

A decode step of a small model is dominated by kernel-launch overhead: hundreds of small
launches per token. The model's forward is captured once per padded batch size and replayed;
each replay only copies the step's inputs into static buffers. The token inputs (ids,
positions) are this module's; the attention metadata belongs to the attention backend, whose
graph hooks (``GraphAttentionBackend``) own those buffers and fill them before each replay.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from pagedserve.backend.runner.attention import AttentionMetadata

# (input ids, positions, metadata) -> final hidden states: the runner's model call.
ModelForward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


class GraphAttentionBackend(Protocol):
    """What an attention backend provides for its kernels to run inside a captured graph."""

    def init_graph_buffers(
        self, max_batch: int, max_blocks: int, max_seq_len: int, device: torch.device
    ) -> None: ...

    def graph_metadata(self, batch_size: int, num_kv_splits: int) -> AttentionMetadata: ...

    def graph_fits(self, metadata: AttentionMetadata) -> bool: ...

    def prepare_replay(self, metadata: AttentionMetadata, batch_size: int) -> None: ...


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
        forward: ModelForward,
        backend: GraphAttentionBackend,
        *,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        device: torch.device,
        kv_splits_for: Callable[[int], int],
    ) -> None:
        """``kv_splits_for(batch_size)`` pins the decode kernel's context split count per graph."""
        self.forward = forward
        self.backend = backend
        self.kv_splits_for = kv_splits_for
        self.sizes = capture_sizes(max_num_seqs)
        n = self.sizes[-1]
        backend.init_graph_buffers(n, -(-max_model_len // block_size), max_model_len, device)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):  # largest first, so smaller ones reuse its pool
            metadata = self.backend.graph_metadata(size, self.kv_splits_for(size))
            args = (self.input_ids[:size], self.positions[:size], metadata)
            for _ in range(2):  # warm up: compile kernels, settle allocations
                self.forward(*args)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self.forward(*args)
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
        return bool(self.graphs) and self.backend.graph_fits(metadata)

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        n = metadata.num_seqs
        size = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.backend.prepare_replay(metadata, size)
        self.graphs[size].replay()
        return self.outputs[size][:n]
