"""Random flat varlen batches over a paged KV cache, shared by the CPU and GPU kernel tests."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pagedserve.kernels.paged_attention import paged_attention_ref


@dataclass
class Batch:
    q: torch.Tensor
    kv_cache: torch.Tensor
    block_tables: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    query_lens: list[int]
    seq_lens_list: list[int]
    slot_mapping: torch.Tensor
    num_real_tokens: int


def make_batch(
    query_lens: list[int],
    context_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    block_size: int = 16,
    padding_tokens: int = 0,
    seed: int = 0,
) -> Batch:
    """A flat varlen batch over a randomly filled cache whose blocks are handed out shuffled,
    with spare blocks (never referenced) also holding random data."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in zip(context_lens, query_lens)]
    blocks_per_seq = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 5
    perm = torch.randperm(num_blocks, generator=gen)
    max_blocks = max(max(blocks_per_seq), 1) + 2  # padded table columns
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    slots: list[int] = []
    used = 0
    for i, (n_blocks, ctx, n) in enumerate(zip(blocks_per_seq, context_lens, query_lens)):
        block_tables[i, :n_blocks] = perm[used : used + n_blocks].int()
        used += n_blocks
        for pos in range(ctx, ctx + n):
            slots.append(int(block_tables[i, pos // block_size]) * block_size + pos % block_size)
    slots += [-1] * padding_tokens
    num_tokens = sum(query_lens) + padding_tokens
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen)
    qsl = torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0).tolist()), dtype=torch.int32)
    return Batch(
        q=q.to(dtype=dtype, device=device),
        kv_cache=kv_cache.to(dtype=dtype, device=device),
        block_tables=block_tables.to(device),
        query_start_loc=qsl.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_lens=query_lens,
        seq_lens_list=seq_lens,
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        num_real_tokens=sum(query_lens),
    )


def reference(
    batch: Batch, scale: float, sliding_window: int | None = None, softcap: float | None = None
) -> torch.Tensor:
    return paged_attention_ref(
        batch.q, batch.kv_cache, batch.block_tables, batch.query_lens, batch.seq_lens_list, scale,
        sliding_window, softcap,
    )
