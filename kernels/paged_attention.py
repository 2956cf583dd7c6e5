"""Attention of a flat varlen batch over the paged KV cache.

Sequence ``i`` owns queries ``query_start_loc[i]:query_start_loc[i+1]`` of the batch; they are
the last ``query_len`` positions of a context of ``seq_len`` tokens, so query ``j`` attends keys
``0 .. seq_len - query_len + j`` (causal within the chunk, full over the cached prefix).

Two per-layer options, one value for every sequence of the call (a layer's own property, so a
CUDA graph bakes them into its kernels):

- ``sliding_window`` W: the query at position p sees only keys in (p - W, p], W keys counting
  itself, as transformers' sliding-window mask (``kv_idx > q_idx - W``) for Mistral, Gemma 2 and
  Gemma 3. Keys before the window are never read: whole KV blocks (Triton: key tiles) before
  its start are skipped, the boundary one is masked.
- ``softcap`` c: scores ``s = scale * q.k`` become ``c * tanh(s / c)`` before the mask and the
  softmax (Gemma 2's attention-logit soft-capping).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pagedserve.kernels.triton_utils import cdiv, next_power_of_2, tl, triton, use_triton


def check_layer_options(sliding_window: int | None, softcap: float | None) -> None:
    """ValueError on a window or cap that has no meaning (a zero window would hide every key)."""
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be a positive number of keys, got {sliding_window}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive, got {softcap}")


def visible_keys(
    query_positions: torch.Tensor, key_positions: torch.Tensor, sliding_window: int | None
) -> torch.Tensor:
    """[queries, keys] bool: causal, and within the window when there is one."""
    seen = key_positions[None, :] <= query_positions[:, None]
    if sliding_window is not None:
        seen &= key_positions[None, :] > query_positions[:, None] - sliding_window
    return seen


def _attend(
    q: torch.Tensor,  # [..., heads, n, d]
    k: torch.Tensor,  # [..., kv_heads, L, d]
    v: torch.Tensor,
    mask: torch.Tensor | None,  # bool, broadcast to [..., heads, n, L]; None: all visible
    scale: float,
    softcap: float | None,
    gqa: bool = False,
    is_causal: bool = False,
) -> torch.Tensor:
    """SDPA, or without it when the scores are soft-capped (SDPA has no hook between the
    scores and the softmax): fp32 scores, capped, masked, softmax, then the V mix."""
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa
        )
    if gqa:
        group = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = softcap * torch.tanh(scores / softcap)
    if is_causal:
        n, length = scores.shape[-2:]
        mask = torch.ones(n, length, dtype=torch.bool, device=q.device).tril(length - n)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)


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
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Reference paged attention; returns [num_tokens, num_heads, head_dim] in q's dtype.

    One sequence at a time over its whole gathered context, with the mask written out: the
    oracle of the CPU path and the Triton kernels, kept plain rather than fast.
    """
    check_layer_options(sliding_window, softcap)
    out = torch.empty_like(q)
    gqa = q.shape[1] != kv_cache.shape[3]
    start = 0
    for i, (n, seq_len) in enumerate(zip(query_lens, seq_lens)):
        if n == 0:
            continue
        k, v = gather_kv(kv_cache, block_tables[i], seq_len)
        qi = q[start : start + n].transpose(0, 1)  # [H, n, D]
        ki = k.transpose(0, 1).to(q.dtype)
        vi = v.transpose(0, 1).to(q.dtype)
        query_positions = torch.arange(seq_len - n, seq_len, device=q.device)
        mask = visible_keys(query_positions, torch.arange(seq_len, device=q.device), sliding_window)
        o = _attend(qi, ki, vi, mask, scale, softcap, gqa)
        out[start : start + n] = o.transpose(0, 1)
        start += n
    return out


# Key positions (summed over sequences) one batched prefill attention call gathers at most.
_MAX_PREFILL_GROUP_KEYS = 8192


def paged_attention_cpu(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    query_lens: list[int],
    seq_lens: list[int],
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The torch path the CPU serves with: ``paged_attention_ref``'s result, fewer and larger calls.

    Sequences are grouped by (query length, context length), so one SDPA call covers a whole
    group on a single gather of its cache blocks; no mask is built when the group's queries all
    see the same keys. Decode groups keep one KV head's query heads as the rows of one attention
    (no expanded K/V copy); prefill groups repeat K/V per query head, which keeps SDPA on its
    flash kernel (grouped-query SDPA on CPU falls back to the unfused math path). With a
    sliding window, a group gathers only the blocks from the one holding its earliest visible
    key on.
    """
    check_layer_options(sliding_window, softcap)
    if not query_lens:
        return torch.empty_like(q)
    num_heads = q.shape[1]
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (n, seq_len) in enumerate(zip(query_lens, seq_lens)):
        if n > 0:
            key = (1, 0) if n == 1 else (n, seq_len)  # decode contexts may differ: masked
            groups.setdefault(key, []).append(i)
    decodes = groups.pop((1, 0), [])
    layer = _LayerOptions(scale, sliding_window, softcap)
    if len(decodes) == len(query_lens) and q.shape[0] == len(decodes):
        # A pure decode batch with no padding: one group whose output is the whole result.
        return _decode_group(q, kv_cache, block_tables, seq_lens, decodes, layer).reshape(q.shape)
    # Prefill groups gather K/V repeated per query head: bound the keys one call holds.
    batches = [(1, decodes)] if decodes else []
    for (n, seq_len), seqs in groups.items():
        per_call = max(1, _MAX_PREFILL_GROUP_KEYS // seq_len)
        batches += [(n, seqs[j : j + per_call]) for j in range(0, len(seqs), per_call)]
    out = torch.empty_like(q)
    for n, seqs in batches:
        rows = _group_rows(seqs, starts, n, q.device)
        q_group = q[rows] if isinstance(rows, slice) else q.index_select(0, rows)
        if n == 1:
            o = _decode_group(q_group, kv_cache, block_tables, seq_lens, seqs, layer)
            o = o.reshape(len(seqs), num_heads, -1)
        else:
            o = _prefill_group(q_group, kv_cache, block_tables, seq_lens[seqs[0]], seqs, n, layer)
        if isinstance(rows, slice):
            out[rows] = o
        else:
            out.index_copy_(0, rows, o)
    return out


@dataclass(frozen=True)
class _LayerOptions:
    scale: float
    sliding_window: int | None
    softcap: float | None

    def first_visible(self, query_position: int) -> int:
        """The earliest key position ``query_position`` sees."""
        if self.sliding_window is None:
            return 0
        return max(0, query_position - self.sliding_window + 1)


def _group_rows(
    seqs: list[int], starts: list[int], n: int, device: torch.device
) -> slice | torch.Tensor:
    """The flat token rows of a group's sequences: a slice when they lie back to back."""
    first = starts[seqs[0]]
    if all(starts[s] == first + j * n for j, s in enumerate(seqs)):
        return slice(first, first + n * len(seqs))
    return torch.tensor([r for s in seqs for r in range(starts[s], starts[s] + n)], device=device)


def _gather_blocks(
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seqs: list[int],
    length: int,
    first_block: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of positions ``first_block * block_size`` up to ``length`` of each sequence,
    each [seqs, positions, kv_heads, d].

    index_select of whole blocks along the leading dimension: one contiguous copy per block.
    """
    block_size = kv_cache.shape[2]
    num_blocks = (length + block_size - 1) // block_size
    rows = block_tables[seqs[0] : seqs[0] + 1] if len(seqs) == 1 else block_tables[seqs]
    tables = rows[:, first_block:num_blocks].flatten().long()
    shape = (len(seqs), (num_blocks - first_block) * block_size, *kv_cache.shape[3:])
    keep = length - first_block * block_size
    k = kv_cache[0].index_select(0, tables).view(shape)[:, :keep]
    v = kv_cache[1].index_select(0, tables).view(shape)[:, :keep]
    return k, v


def _decode_group(
    q: torch.Tensor,  # [seqs, num_heads, head_dim], one token per sequence
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: list[int],
    seqs: list[int],
    layer: _LayerOptions,
) -> torch.Tensor:
    """[seqs, kv_heads, group, head_dim]: each KV head's query heads attend as its rows."""
    num_kv_heads, head_dim = kv_cache.shape[3:]
    block_size = kv_cache.shape[2]
    lens = [seq_lens[i] for i in seqs]
    max_len = max(lens)
    first_block = min(layer.first_visible(n - 1) for n in lens) // block_size
    k, v = _gather_blocks(kv_cache, block_tables, seqs, max_len, first_block)
    k, v = k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype)  # [seqs, kv_heads, len, d]
    qg = q.reshape(len(seqs), num_kv_heads, -1, head_dim)
    mask = None
    offset = first_block * block_size
    if min(lens) != max_len or layer.first_visible(max_len - 1) > offset:
        key_positions = torch.arange(offset, max_len, device=q.device)
        query_positions = torch.tensor(lens, device=q.device) - 1
        mask = visible_keys(query_positions, key_positions, layer.sliding_window)[:, None, None, :]
    return _attend(qg, k, v, mask, layer.scale, layer.softcap)


def _prefill_group(
    q: torch.Tensor,  # [seqs * n, num_heads, head_dim], sequence-major
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_len: int,
    seqs: list[int],
    n: int,
    layer: _LayerOptions,
) -> torch.Tensor:
    """[seqs * n, num_heads, head_dim] for sequences sharing query and context lengths."""
    num_seqs = len(seqs)
    num_heads, head_dim = q.shape[1:]
    num_kv_heads = kv_cache.shape[3]
    block_size = kv_cache.shape[2]
    ctx = seq_len - n
    first_block = layer.first_visible(ctx) // block_size
    k, v = _gather_blocks(kv_cache, block_tables, seqs, seq_len, first_block)
    length = k.shape[1]
    if num_kv_heads != num_heads:
        shape = (num_seqs, length, num_kv_heads, num_heads // num_kv_heads, head_dim)
        k = k.unsqueeze(3).expand(shape).reshape(num_seqs, length, num_heads, head_dim)
        v = v.unsqueeze(3).expand(shape).reshape(num_seqs, length, num_heads, head_dim)
    k, v = k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype)  # [seqs, heads, len, d]
    qs = q.reshape(num_seqs, n, num_heads, head_dim).transpose(1, 2)
    causal_only = layer.first_visible(seq_len - 1) == 0
    if ctx == 0 and causal_only:
        o = _attend(qs, k, v, None, layer.scale, layer.softcap, is_causal=True)
    else:
        offset = first_block * block_size
        query_positions = torch.arange(ctx, seq_len, device=q.device)
        key_positions = torch.arange(offset, seq_len, device=q.device)
        mask = visible_keys(query_positions, key_positions, layer.sliding_window)
        o = _attend(qs, k, v, mask, layer.scale, layer.softcap)
    return o.transpose(1, 2).reshape(num_seqs * n, num_heads, head_dim)


# tl.dot needs at least 16 rows (and columns); decode programs pad their query heads up to it.
_MIN_DOT_ROWS = 16


@dataclass(frozen=True)
class AttentionKernelConfig:
    """Tile sizes and the split-KV policy of the Triton path (defaults suit H100-class GPUs)."""

    # Varlen (prefill / mixed) kernel. block_m: query rows one program holds, i.e. query tokens
    # x the query heads of one KV head. block_n: keys per inner-loop tile for head dims up to
    # 64, block_n_wide_heads above; neither need match the cache block size. All are powers of
    # two >= 16.
    # In bf16 the tile boundaries decide the rounding: each tile's probabilities are rounded to
    # bf16 relative to the running maximum at that tile. 128-key tiles walked from key 0 are
    # the boundaries of cuDNN's fused attention, PyTorch's default SDPA kernel on Hopper (so
    # transformers' bf16 models run it); with them the 16-bit kernel, which also rounds every
    # step as cuDNN does, is bit-identical to it (32-key tiles: 9-22% of elements differ).
    # With head dim 64 those tiles run about as fast as 32-key ones or faster (H200: 236 vs
    # 238 TFLOP/s at 4x2048, 303 vs 270 at 1x8192); with 128 they cost a third of the prefill
    # rate (197 vs 295), so wide heads keep 32-key tiles.
    block_m: int = 64
    block_n: int = 128
    block_n_wide_heads: int = 32
    num_warps: int = 4
    num_stages: int = 2
    # Decode kernel (one query token per sequence).
    decode_block_n: int = 64
    decode_num_warps: int = 2
    decode_num_stages: int = 4
    # Split-KV decode: enough programs for this many waves over the SMs, at most
    # max_kv_splits partitions, each at least min_tokens_per_split keys of the longest context.
    split_waves: int = 2
    max_kv_splits: int = 32
    min_tokens_per_split: int = 256

    def varlen_block_n(self, head_dim: int) -> int:
        """Keys per tile of the varlen kernel for this head dim."""
        return self.block_n if head_dim <= 64 else self.block_n_wide_heads

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_n_wide_heads", "decode_block_n"):
            value = getattr(self, name)
            if value < _MIN_DOT_ROWS or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= {_MIN_DOT_ROWS}, got {value}")


DEFAULT_ATTENTION_CONFIG = AttentionKernelConfig()
_LOG2E = 1.4426950408889634


@triton.jit
def _attend_key_range(
    acc,
    m_i,
    l_i,
    q,
    k_cache_ptr,
    v_cache_ptr,
    block_table_row_ptr,
    head_offset,
    cache_block_stride,
    cache_slot_stride,
    kv_start,
    kv_end,
    causal_limit,
    window_start,
    qk_scale,
    softcap_log2e,
    dim_offsets,
    dim_mask,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    LANE_SUMS: tl.constexpr,
    WINDOWED: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """Online softmax (base 2, fp32) of q's rows over keys [kv_start, kv_end).

    With MASKED a key is seen by a row when it is below kv_end and its position is <= that
    row's causal_limit (and, WINDOWED, >= its window_start); without, the caller guarantees
    whole tiles every row may see, and the tile loop skips the masking work. With LANE_SUMS the
    denominator ``l_i`` is kept as ``_lane_partial_sums`` partials, [rows, 4], else as one sum
    per row. SOFTCAP: ``qk_scale`` is scale / cap and the scores become
    ``tanh(qk_scale * q.k) * softcap_log2e`` (cap * log2(e)), i.e. cap * tanh(s / cap) in base 2.
    """
    key_offsets = tl.arange(0, BLOCK_N)
    for tile_start in range(kv_start, kv_end, BLOCK_N):
        pos = tile_start + key_offsets
        if MASKED:
            in_range = pos < kv_end
        else:
            in_range = pos >= 0
        block = tl.load(block_table_row_ptr + pos // BLOCK_SIZE, mask=in_range, other=0)
        slot = block.to(tl.int64) * cache_block_stride + (pos % BLOCK_SIZE) * cache_slot_stride
        slot += head_offset
        kv_mask = in_range[None, :] & dim_mask[:, None]
        k_t = tl.load(k_cache_ptr + slot[None, :] + dim_offsets[:, None], mask=kv_mask, other=0.0)
        scores = tl.dot(q, k_t.to(q.dtype), input_precision="ieee") * qk_scale
        if SOFTCAP:
            scores = _tanh(scores) * softcap_log2e
        if MASKED:
            seen = (pos[None, :] <= causal_limit[:, None]) & in_range[None, :]
            if WINDOWED:
                seen = seen & (pos[None, :] >= window_start[:, None])
            scores = tl.where(seen, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            # Rows that have seen no key keep m = -inf; shift them by 0 so exp2 gives 0, not NaN.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            m_shift = m_new
        p = tl.exp2(scores - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        # One rounding for the rescaled denominator, written out: 16-bit varlen kernels are
        # compiled without automatic contraction.
        if LANE_SUMS:
            l_i = tl.fma(l_i, alpha[:, None], _lane_partial_sums(p, BLOCK_N))
        else:
            l_i = tl.fma(l_i, alpha, tl.sum(p, axis=1))
        v = tl.load(
            v_cache_ptr + slot[:, None] + dim_offsets[None, :],
            mask=in_range[:, None] & dim_mask[None, :],
            other=0.0,
        ).to(q.dtype)
        acc = tl.dot(p.to(q.dtype), v, acc * alpha[:, None], input_precision="ieee")
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _tanh(x):
    """tanh from one exp2, exact at both tails (exp2 overflowing to inf gives 1, not NaN); the
    interpreter has no libdevice, so the GPU and the CPU tests run this same formula."""
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * 1.4426950408889634)) + 1.0)


@triton.jit
def _lane_partial_sums(p, BLOCK_N: tl.constexpr):
    """[rows, 4]: each row's sum over the key columns ``8 j + 2 c + e`` for c = 0..3, summed
    in order of (j, e).

    On Hopper these are the columns one thread of a quad holds in the MMA result, in its
    register order, so the sum stays in the thread and adds one value at a time. Carrying
    the four partials across tiles and joining them only at the end, as
    ``_join_lane_sums``, is how cuDNN's fused attention sums its softmax denominators:
    together with its 128-key tiles this makes bf16 outputs bit-identical to it.
    """
    rows: tl.constexpr = p.shape[0]
    x = tl.reshape(p, [rows, BLOCK_N // 8, 4, 2])
    x = tl.reshape(tl.permute(x, [0, 2, 1, 3]), [rows, 4, BLOCK_N // 4])
    return tl.sum(x, axis=2)


@triton.jit
def _join_lane_sums(l4):
    """One sum per row from ``_lane_partial_sums`` partials: (l0 + l1) + (l2 + l3)."""
    rows: tl.constexpr = l4.shape[0]
    return tl.sum(tl.sum(tl.reshape(l4, [rows, 2, 2]), axis=2), axis=1)


@triton.jit
def _find_sequence(query_start_loc_ptr, num_seqs, q_block, BLOCK_Q: tl.constexpr):
    """Sequence owning flat query block ``q_block``: sequence i owns blocks from
    query_start_loc[i] // BLOCK_Q + i on, which leaves room for its ragged last block."""
    lo = tl.program_id(0) * 0
    hi = lo + num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        go_right = first <= q_block
        lo = tl.where(go_right, mid + 1, lo)
        hi = tl.where(go_right, hi, mid)
    return lo - 1


# num_seqs and the block-table width (the step's longest sequence, in blocks) vary per step:
# keep one compiled kernel for all their values. Triton would otherwise compile a variant for
# a value of 1 and one for multiples of 16, each a stall of every stream the first time.
@triton.jit(do_not_specialize=["num_seqs", "block_table_stride"])
def _varlen_paged_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    num_seqs,
    qk_scale,
    softcap_log2e,
    head_dim,
    q_token_stride,
    q_head_stride,
    out_token_stride,
    out_head_stride,
    cache_block_stride,
    cache_slot_stride,
    cache_head_stride,
    block_table_stride,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    LANE_SUMS: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """One program: BLOCK_Q query tokens of one sequence x the GROUP query heads of one KV head,
    so every K/V tile is loaded once for the whole group. LANE_SUMS: see ``_lane_partial_sums``.
    SLIDING_WINDOW: 0 for full attention, else the window W (one compiled kernel per value)."""
    q_block_id = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_sequence(query_start_loc_ptr, num_seqs, q_block_id, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_block = q_block_id - (q_start // BLOCK_Q + seq)
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    q_pos = q_block * BLOCK_Q + rows // GROUP_PAD
    head = kv_head * GROUP + rows % GROUP_PAD
    row_valid = (q_pos < q_len) & (rows % GROUP_PAD < GROUP)
    token = (q_start + q_pos).to(tl.int64)
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_mask = dims < head_dim
    io_mask = row_valid[:, None] & dim_mask[None, :]
    q = tl.load(
        q_ptr + token[:, None] * q_token_stride + head[:, None] * q_head_stride + dims[None, :],
        mask=io_mask,
        other=0.0,
    )
    causal_limit = tl.where(row_valid, context_len + q_pos, -1)
    kv_end = tl.minimum(seq_len, context_len + (q_block + 1) * BLOCK_Q)
    first_pos = context_len + q_block * BLOCK_Q
    # Whole key tiles below the block's first query position are visible to every row.
    unmasked_end = (first_pos + 1) // BLOCK_N * BLOCK_N
    if SLIDING_WINDOW > 0:
        window_start = causal_limit - SLIDING_WINDOW + 1
        # Tiles before the first row's window are skipped; from the tile holding its start to
        # the first tile wholly inside the last row's window, keys are masked per row.
        kv_start = tl.maximum(first_pos - SLIDING_WINDOW + 1, 0) // BLOCK_N * BLOCK_N
        full_start = tl.cdiv(tl.maximum(kv_end - SLIDING_WINDOW, 0), BLOCK_N) * BLOCK_N
        unmasked_start = tl.minimum(full_start, unmasked_end)
    else:
        window_start = causal_limit
        kv_start = 0
        unmasked_start = 0

    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), dtype=tl.float32)
    if LANE_SUMS:
        l_i = tl.zeros([BLOCK_Q * GROUP_PAD, 4], dtype=tl.float32)
    else:
        l_i = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * block_table_stride
    head_offset = kv_head.to(tl.int64) * cache_head_stride
    if SLIDING_WINDOW > 0:
        acc, m_i, l_i = _attend_key_range(
            acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, table_row, head_offset,
            cache_block_stride, cache_slot_stride, kv_start, unmasked_start, causal_limit,
            window_start, qk_scale, softcap_log2e, dims, dim_mask, BLOCK_SIZE, BLOCK_N, True,
            LANE_SUMS, True, SOFTCAP,
        )
    acc, m_i, l_i = _attend_key_range(
        acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, table_row, head_offset,
        cache_block_stride, cache_slot_stride, unmasked_start, unmasked_end, causal_limit,
        window_start, qk_scale, softcap_log2e, dims, dim_mask, BLOCK_SIZE, BLOCK_N, False,
        LANE_SUMS, False, SOFTCAP,
    )
    acc, m_i, l_i = _attend_key_range(
        acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, table_row, head_offset,
        cache_block_stride, cache_slot_stride, unmasked_end, kv_end, causal_limit,
        window_start, qk_scale, softcap_log2e, dims, dim_mask, BLOCK_SIZE, BLOCK_N, True,
        LANE_SUMS, SLIDING_WINDOW > 0, SOFTCAP,
    )
    if LANE_SUMS:
        l_i = _join_lane_sums(l_i)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        out_ptr + token[:, None] * out_token_stride + head[:, None] * out_head_stride + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=io_mask,
    )


# The split count is a runtime value (one compiled kernel for every count, so a new count met
# while serving is not a compile that stalls every stream); SPLIT picks the single-pass store.
# The block-table width varies per eager step, as in the varlen kernel.
@triton.jit(do_not_specialize=["num_splits", "block_table_stride"])
def _decode_paged_attention_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    part_acc_ptr,
    part_max_ptr,
    part_sum_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    qk_scale,
    softcap_log2e,
    head_dim,
    q_token_stride,
    q_head_stride,
    out_token_stride,
    out_head_stride,
    cache_block_stride,
    cache_slot_stride,
    cache_head_stride,
    block_table_stride,
    num_splits,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    SLIDING_WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """One program: the single query token of one sequence x one KV head's query heads, over
    partition ``program_id(2)`` of the context. With one partition it writes the output;
    otherwise it writes unnormalised partials (acc, running max, running sum) for the merge.
    Sequences with no query token (batch padding) are skipped. With a SLIDING_WINDOW the
    partitions cover the window only, from the key tile holding its first key."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) - q_start != 1:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    if SLIDING_WINDOW > 0:
        first_key = tl.maximum(seq_len - SLIDING_WINDOW, 0)
        keys_base = first_key // BLOCK_N * BLOCK_N
    else:
        first_key = 0
        keys_base = 0
    # Partitions are sized from this sequence's own length, so every one has work when the
    # context is long enough, whatever the batch's longest context.
    split_len = tl.cdiv(tl.cdiv(seq_len - keys_base, num_splits), BLOCK_N) * BLOCK_N
    kv_start = keys_base + split * split_len
    kv_end = tl.minimum(seq_len, kv_start + split_len)

    rows = tl.arange(0, BLOCK_M)
    row_valid = rows < GROUP
    head = kv_head * GROUP + rows
    token = q_start.to(tl.int64)
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_mask = dims < head_dim
    io_mask = row_valid[:, None] & dim_mask[None, :]
    q = tl.load(
        q_ptr + token * q_token_stride + head[:, None] * q_head_stride + dims[None, :],
        mask=io_mask,
        other=0.0,
    )
    causal_limit = tl.where(row_valid, seq_len - 1, -1)
    window_start = causal_limit * 0 + first_key
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * block_table_stride
    head_offset = kv_head.to(tl.int64) * cache_head_stride
    # Whole tiles need no mask; only the partition's ragged last tile does, and (windowed) the
    # tile holding the window's first key.
    unmasked_start = kv_start
    if SLIDING_WINDOW > 0:
        boundary_end = tl.cdiv(first_key, BLOCK_N) * BLOCK_N
        unmasked_start = tl.maximum(kv_start, tl.minimum(boundary_end, kv_end))
        acc, m_i, l_i = _attend_key_range(
            acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, table_row, head_offset,
            cache_block_stride, cache_slot_stride, kv_start, unmasked_start, causal_limit,
            window_start, qk_scale, softcap_log2e, dims, dim_mask, BLOCK_SIZE, BLOCK_N, True,
            False, True, SOFTCAP,
        )
    unmasked_end = unmasked_start + tl.maximum(kv_end - unmasked_start, 0) // BLOCK_N * BLOCK_N
    acc, m_i, l_i = _attend_key_range(
        acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, table_row, head_offset,
        cache_block_stride, cache_slot_stride, unmasked_start, unmasked_end, causal_limit,
        window_start, qk_scale, softcap_log2e, dims, dim_mask, BLOCK_SIZE, BLOCK_N, False,
        False, False, SOFTCAP,
    )
    acc, m_i, l_i = _attend_key_range(
        acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, table_row, head_offset,
        cache_block_stride, cache_slot_stride, unmasked_end, kv_end, causal_limit,
        window_start, qk_scale, softcap_log2e, dims, dim_mask, BLOCK_SIZE, BLOCK_N, True,
        False, False, SOFTCAP,
    )
    if not SPLIT:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            out_ptr + token * out_token_stride + head[:, None] * out_head_stride + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=io_mask,
        )
    else:
        # Partials are [num_seqs, num_heads, num_splits] (x HEAD_DIM_PAD for acc), contiguous.
        part = (seq.to(tl.int64) * tl.num_programs(1) * GROUP + head) * num_splits + split
        tl.store(part_max_ptr + part, m_i, mask=row_valid)
        tl.store(part_sum_ptr + part, l_i, mask=row_valid)
        tl.store(
            part_acc_ptr + part[:, None] * HEAD_DIM_PAD + dims[None, :],
            acc,
            mask=row_valid[:, None],
        )


@triton.jit(do_not_specialize=["num_splits"])
def _merge_kv_splits_kernel(
    out_ptr,
    part_acc_ptr,
    part_max_ptr,
    part_sum_ptr,
    query_start_loc_ptr,
    head_dim,
    out_token_stride,
    out_head_stride,
    num_splits,
    SPLITS_PAD: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
):
    """Combines one (sequence, head)'s partitions: rescale each by exp2(max_s - max) and divide
    the summed accumulators by the summed softmax denominators."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) - q_start != 1:
        return
    splits = tl.arange(0, SPLITS_PAD)
    split_mask = splits < num_splits
    part = (seq.to(tl.int64) * tl.num_programs(1) + head) * num_splits + splits
    m = tl.load(part_max_ptr + part, mask=split_mask, other=float("-inf"))
    sums = tl.load(part_sum_ptr + part, mask=split_mask, other=0.0)
    m_max = tl.max(m, axis=0)
    weight = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))
    denom = tl.sum(weight * sums, axis=0)
    dims = tl.arange(0, HEAD_DIM_PAD)
    acc = tl.load(
        part_acc_ptr + part[:, None] * HEAD_DIM_PAD + dims[None, :],
        mask=split_mask[:, None],
        other=0.0,
    )
    out = tl.sum(acc * weight[:, None], axis=0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(
        out_ptr + q_start.to(tl.int64) * out_token_stride + head * out_head_stride + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=dims < head_dim,
    )


def choose_num_kv_splits(
    num_seqs: int,
    num_kv_heads: int,
    max_seq_len: int,
    num_sms: int,
    config: AttentionKernelConfig = DEFAULT_ATTENTION_CONFIG,
) -> int:
    """Partitions per decode sequence: split only when (sequences x KV heads) leave SMs idle
    and the longest context is long enough for every partition to stream real work."""
    programs = max(1, num_seqs * num_kv_heads)
    if programs >= num_sms:
        return 1
    by_occupancy = cdiv(config.split_waves * num_sms, programs)
    by_length = max_seq_len // config.min_tokens_per_split
    return max(1, min(config.max_kv_splits, by_occupancy, by_length))


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _check_shapes(
    q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
) -> None:
    num_heads, head_dim = q.shape[1:]
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.shape[4] != head_dim:
        raise ValueError(f"kv_cache {tuple(kv_cache.shape)} is not [2, blocks, block_size, kv_heads, {head_dim}]")
    if num_heads % kv_cache.shape[3]:
        raise ValueError(f"{num_heads} query heads do not group over {kv_cache.shape[3]} KV heads")
    num_seqs = seq_lens.shape[0]
    if query_start_loc.shape[0] != num_seqs + 1 or block_tables.shape[0] != num_seqs:
        raise ValueError("query_start_loc needs num_seqs + 1 entries and block_tables num_seqs rows")
    if q.stride(-1) != 1 or kv_cache.stride(-1) != 1 or block_tables.stride(-1) != 1:
        raise ValueError("q, kv_cache and block_tables need a unit stride on their last dimension")


def paged_attention_triton(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    out: torch.Tensor | None = None,
    num_kv_splits: int | None = None,
    config: AttentionKernelConfig = DEFAULT_ATTENTION_CONFIG,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Triton paged attention; returns ``out`` ([num_tokens, num_heads, head_dim], q's dtype).

    Launch sizes depend only on tensor shapes and the host bounds ``max_query_len`` (>= every
    query length) and ``max_seq_len``, never on device data, so a captured CUDA graph replays
    correctly with new metadata contents. ``max_query_len == 1`` selects the decode kernel,
    which splits the context over ``num_kv_splits`` partitions (chosen from the SM count when
    None; the CPU interpreter defaults to 1). Tokens past ``query_start_loc[-1]`` are padding
    and their output rows are left as they are. ``sliding_window`` and ``softcap`` are compile-
    time properties of the kernels (a layer's, fixed across steps and graph replays).
    """
    _check_shapes(q, kv_cache, block_tables, query_start_loc, seq_lens)
    check_layer_options(sliding_window, softcap)
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1):
        raise ValueError("out must match q in shape and dtype, with a unit stride on head_dim")
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    num_seqs = seq_lens.shape[0]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q) if out is None else out
    if num_tokens == 0 or num_seqs == 0:
        return out
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    head_dim_pad = next_power_of_2(head_dim)
    common = dict(
        qk_scale=scale * _LOG2E if softcap is None else scale / softcap,
        softcap_log2e=0.0 if softcap is None else softcap * _LOG2E,
        head_dim=head_dim,
        q_token_stride=q.stride(0),
        q_head_stride=q.stride(1),
        out_token_stride=out.stride(0),
        out_head_stride=out.stride(1),
        cache_block_stride=k_cache.stride(0),
        cache_slot_stride=k_cache.stride(1),
        cache_head_stride=k_cache.stride(2),
        block_table_stride=block_tables.stride(0),
        GROUP=group,
        BLOCK_SIZE=block_size,
        HEAD_DIM_PAD=head_dim_pad,
        SLIDING_WINDOW=sliding_window or 0,
        SOFTCAP=softcap is not None,
    )
    if max_query_len > 1:
        group_pad = next_power_of_2(group)
        block_q = min(max(1, config.block_m // group_pad), next_power_of_2(max_query_len))
        block_q = max(block_q, cdiv(_MIN_DOT_ROWS, group_pad))
        grid = (num_tokens // block_q + num_seqs, num_kv_heads)
        # 16-bit inputs round as cuDNN's attention does (tensor-core tiles). No automatic FMA
        # contraction: on unmasked tiles it would fold the score scaling into the exponent's
        # subtraction (one rounding where cuDNN rounds twice). fp32 keeps its own order: its
        # dot is not an MMA, so there are no lanes to mirror (and Triton 3.6 miscompiled the
        # lane sums of that layout: wrong outputs in the fp32 mixed-batch test on an H200).
        cudnn_rounding = q.dtype != torch.float32
        _varlen_paged_attention_kernel[grid](
            q, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens, num_seqs,
            GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_N=config.varlen_block_n(head_dim), **common,
            LANE_SUMS=cudnn_rounding, enable_fp_fusion=not cudnn_rounding,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
        return out

    if num_kv_splits is None:
        num_kv_splits = 1
        if q.is_cuda:
            num_sms = _num_sms(q.device.index if q.device.index is not None else torch.cuda.current_device())
            keys = max_seq_len if sliding_window is None else min(max_seq_len, sliding_window)
            num_kv_splits = choose_num_kv_splits(num_seqs, num_kv_heads, keys, num_sms, config)
    if num_kv_splits < 1:
        raise ValueError(f"num_kv_splits must be >= 1, got {num_kv_splits}")
    parts = (num_seqs, num_heads, num_kv_splits)
    if num_kv_splits > 1:
        part_acc = torch.empty(*parts, head_dim_pad, dtype=torch.float32, device=q.device)
        part_max = torch.empty(parts, dtype=torch.float32, device=q.device)
        part_sum = torch.empty(parts, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_max = part_sum = out  # unused by the single-partition kernel
    block_m = max(_MIN_DOT_ROWS, next_power_of_2(group))
    _decode_paged_attention_kernel[(num_seqs, num_kv_heads, num_kv_splits)](
        q, k_cache, v_cache, out, part_acc, part_max, part_sum,
        block_tables, query_start_loc, seq_lens,
        BLOCK_M=block_m, SPLIT=num_kv_splits > 1, BLOCK_N=config.decode_block_n,
        num_splits=num_kv_splits, **common,
        num_warps=config.decode_num_warps, num_stages=config.decode_num_stages,
    )
    if num_kv_splits > 1:
        _merge_kv_splits_kernel[(num_seqs, num_heads)](
            out, part_acc, part_max, part_sum, query_start_loc,
            head_dim, out.stride(0), out.stride(1), num_kv_splits,
            # Padded to the configured maximum, so every split count shares one compiled kernel.
            SPLITS_PAD=next_power_of_2(max(num_kv_splits, config.max_kv_splits)),
            HEAD_DIM_PAD=head_dim_pad,
        )
    return out


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Paged attention: the Triton kernels on CUDA, the torch reference elsewhere (where the
    host copies of the lengths cost no device sync)."""
    if use_triton(q):
        return paged_attention_triton(
            q, kv_cache, block_tables, query_start_loc, seq_lens, scale, max_query_len,
            max_seq_len, sliding_window=sliding_window, softcap=softcap,
        )
    query_lens = (query_start_loc[1:] - query_start_loc[:-1]).tolist()
    return paged_attention_ref(
        q, kv_cache, block_tables, query_lens, seq_lens.tolist(), scale, sliding_window, softcap
    )
