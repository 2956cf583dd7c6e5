"""Attention of a flat varlen batch over the paged KV cache.

Sequence ``i`` owns queries ``query_start_loc[i]:query_start_loc[i+1]`` of the batch; they are
the last ``query_len`` positions of a context of ``seq_len`` tokens, so query ``j`` attends keys
``0 .. seq_len - query_len + j`` (causal within the chunk, full over the cached prefix).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_kv(
    kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``seq_len`` K and V rows of one sequence, [seq_len, num_kv_heads, head_dim]."""
    block_size = kv_cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = block_table[:num_blocks].long()
    k = kv_cache[0, blocks].flatten(0, 1)[:seq_len]
    v = kv_cache[1, blocks].flatten(0, 1)[:seq_len]
    return k, v


def paged_attention_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    query_lens: list[int],
    seq_lens: list[int],
    scale: float,
) -> torch.Tensor:
    """Reference paged attention; returns [num_tokens, num_heads, head_dim] in q's dtype.

    Single-token (decode) sequences are batched into one padded attention call; prefill chunks
    run one sequence at a time, since each has enough rows to amortise the call.
    """
    out = torch.empty_like(q)
    num_heads = q.shape[1]
    num_kv_heads = kv_cache.shape[3]
    gqa = num_heads != num_kv_heads
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)

    decode_idx = [i for i, n in enumerate(query_lens) if n == 1]
    if decode_idx:
        _decode_batch(q, kv_cache, block_tables, starts, seq_lens, decode_idx, scale, gqa, out)

    for i, n in enumerate(query_lens):
        if n == 1 or n == 0:
            continue
        k, v = gather_kv(kv_cache, block_tables[i], seq_lens[i])
        qi = q[starts[i] : starts[i] + n].transpose(0, 1)  # [H, n, D]
        ki = k.transpose(0, 1).to(q.dtype)
        vi = v.transpose(0, 1).to(q.dtype)
        ctx = seq_lens[i] - n
        if ctx == 0:
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            rows = torch.arange(n, device=q.device)[:, None] + ctx
            mask = torch.arange(seq_lens[i], device=q.device)[None, :] <= rows
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale, enable_gqa=gqa)
        out[starts[i] : starts[i] + n] = o.transpose(0, 1)
    return out


def _decode_batch(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    starts: list[int],
    seq_lens: list[int],
    decode_idx: list[int],
    scale: float,
    gqa: bool,
    out: torch.Tensor,
) -> None:
    block_size = kv_cache.shape[2]
    device = q.device
    lens = torch.tensor([seq_lens[i] for i in decode_idx], device=device)
    max_len = int(max(seq_lens[i] for i in decode_idx))
    max_blocks = (max_len + block_size - 1) // block_size
    rows = torch.tensor(decode_idx, device=device)
    tables = block_tables[rows, :max_blocks].long()  # [B, max_blocks]
    k = kv_cache[0, tables].flatten(1, 2)[:, :max_len]  # [B, L, Hkv, D]
    v = kv_cache[1, tables].flatten(1, 2)[:, :max_len]
    token_rows = torch.tensor([starts[i] for i in decode_idx], device=device)
    qd = q[token_rows].unsqueeze(2)  # [B, H, 1, D]
    mask = (torch.arange(max_len, device=device)[None, :] < lens[:, None])[:, None, None, :]
    o = F.scaled_dot_product_attention(
        qd, k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype),
        attn_mask=mask, scale=scale, enable_gqa=gqa,
    )
    out[token_rows] = o.squeeze(2)
