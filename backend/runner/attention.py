"""Attention over the paged KV cache, behind one narrow interface.

A step's batch is flat and variable-length: the tokens of every scheduled sequence are
concatenated (prefill chunks and single decode tokens mixed), and ``AttentionMetadata`` says
where each sequence starts, how long its whole context is and which cache blocks hold it.
Two implementations sit behind ``AttentionBackend``: plain torch (the CPU path, checked against
the torch reference that is also the Triton kernels' oracle) and the Triton kernels (CUDA),
chosen by device.

KV cache layout, per layer: ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (index 0 is
K, 1 is V). A token at position ``p`` of a sequence lives in slot
``block_table[p // block_size] * block_size + p % block_size``.

The caches and the metadata reach the model's attention layers through the forward context
(``forward_context``), not through the model's arguments: the runner opens it around each
model call, and each ``Attention`` layer picks its own cache from it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

import torch

from pagedserve.kernels import kv_cache as kv_cache_ops
from pagedserve.kernels import paged_attention as paged_attention_ops
from pagedserve.kernels.paged_attention import DEFAULT_ATTENTION_CONFIG, AttentionKernelConfig


@dataclass
class AttentionMetadata:
    """One step's batch layout, shared by every layer.

    Tensors are on the model's device; the ``*_cpu`` lists are host copies the torch path
    uses to slice without device syncs.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64; -1 marks padding tokens (not written)
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, cumulative query lengths
    seq_lens: torch.Tensor  # [num_seqs] int32, context length after this step (cached + new)
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32, padded with 0
    max_query_len: int
    max_seq_len: int
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    # Triton decode only: context partitions per sequence (split-KV); None lets the kernel
    # choose from max_seq_len and the SM count. A CUDA graph may pin it at capture.
    num_kv_splits: int | None = None

    @classmethod
    def single_prefill(cls, n: int, block_size: int, device: torch.device | str) -> AttentionMetadata:
        """One sequence of ``n`` new tokens with no cached prefix, stored in blocks 0, 1, ...
        (profiling steps, whole-prompt logits)."""
        blocks = -(-n // block_size)
        return cls(
            slot_mapping=torch.arange(n, dtype=torch.int64, device=device),
            query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=device),
            seq_lens=torch.tensor([n], dtype=torch.int32, device=device),
            block_tables=torch.arange(blocks, dtype=torch.int32, device=device).unsqueeze(0),
            max_query_len=n,
            max_seq_len=n,
            query_lens_cpu=[n],
            seq_lens_cpu=[n],
        )

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1


@dataclass(frozen=True)
class ForwardContext:
    """What every attention layer of one step's forward reads besides its q, k and v."""

    metadata: AttentionMetadata
    kv_caches: list[torch.Tensor]  # one per layer, [2, num_blocks, block_size, kv_heads, head_dim]


# A context variable, not a module global: two engines may run forwards on two threads of one
# process, and each thread (or task) sees only the context it opened.
_forward_context: ContextVar[ForwardContext | None] = ContextVar("forward_context", default=None)


@contextmanager
def forward_context(
    metadata: AttentionMetadata, kv_caches: list[torch.Tensor]
) -> Iterator[ForwardContext]:
    """Run the model inside this to give its attention layers the step's metadata and caches.

    CUDA graphs need it only while they capture: a replay reruns the captured kernels on the
    static buffers the captured metadata points to.
    """
    context = ForwardContext(metadata, kv_caches)
    token = _forward_context.set(context)
    try:
        yield context
    finally:
        _forward_context.reset(token)


def get_forward_context() -> ForwardContext:
    """The context of the forward in progress on this thread; RuntimeError outside one."""
    context = _forward_context.get()
    if context is None:
        raise RuntimeError(
            "no forward context: run the model inside "
            "forward_context(metadata, kv_caches), which gives its attention layers the "
            "step's batch layout and KV caches"
        )
    return context


class AttentionBackend(Protocol):
    """Writes this step's K/V into the cache, then attends each query to its context.

    ``sliding_window`` and ``softcap`` are the calling layer's own (see
    ``pagedserve.kernels.paged_attention``): the same on every step, so a captured CUDA graph
    holds them in its kernels and its replays need no new metadata for them. Every block of a
    sequence stays cached whatever the window; a window only limits which keys are read.
    """

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        ...


class TorchAttentionBackend:
    """Plain torch, the CPU path: ``paged_attention_cpu``, which batches sequences of equal
    shape into single calls and is tested against ``paged_attention_ref``, the simple oracle
    the Triton kernels are tested against too."""

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        kv_cache_ops.write_kv_cache_ref(k, v, kv_cache, metadata.slot_mapping)
        return paged_attention_ops.paged_attention_cpu(
            q,
            kv_cache,
            metadata.block_tables,
            metadata.query_lens_cpu,
            metadata.seq_lens_cpu,
            scale,
            sliding_window,
            softcap,
        )

# -- the CUDA path -----------------------------------------------------------------------------
# Only device tensors and the host bounds ``max_query_len`` / ``max_seq_len`` of the metadata
# reach the Triton kernels (never the ``*_cpu`` lists), so every launch size is fixed by shapes
# and those bounds. The graph hooks own the static metadata buffers a captured decode graph
# reads: capture takes views of them (query length 1, the model's max length as the bound, a
# pinned split count) and every replay first copies the step's metadata into them, so the
# backend alone knows what its kernels need from a graph (``graphs.py`` drives them).


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
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        kv_cache_ops.write_kv_cache_triton(k, v, kv_cache, metadata.slot_mapping)
        return paged_attention_ops.paged_attention_triton(
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
            sliding_window=sliding_window,
            softcap=softcap,
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


def get_attention_backend(device: torch.device) -> AttentionBackend:
    """Triton kernels on CUDA, the torch reference elsewhere."""
    if device.type == "cuda":
        return TritonAttentionBackend()
    return TorchAttentionBackend()
