"""Sort-free sampling of a batch of rows: temperature, top-k, top-p and min-p in one kernel.

Every filter keeps the tokens whose logit reaches a per-row threshold, so the kernel never
sorts the vocabulary: it finds the threshold by a search on the logit value, counting tokens
(top-k) or summing probability mass (top-p) at several pivots per pass over the row (a pass
narrows the interval ``pivots + 1`` times), and stops as soon as the kept set is determined. The draw is a Gumbel-max race over the kept
tokens, ``argmax(x / T - log E)`` with ``E ~ Exp(1)``, whose noise comes from Philox counters
``(token id, position)`` under the row's key: a seeded request draws the same numbers whatever
else shares the batch, and nothing needs a normalised distribution or a cumulative sum.

The kept set, in every path (this kernel and the torch reference ``kept_threshold``):
- top-k keeps the k highest logits, and any tied with the k-th;
- top-p then keeps the smallest set of the highest logits whose probability mass, renormalised
  over the top-k set, reaches p (the token that crosses p is kept, and any tied with it);
- min-p keeps tokens at least ``min_p`` times as probable as the most probable one;
all three after the temperature, the kept set being what every one of them keeps. Rows with
temperature 0 are an argmax (the first index among equal maxima, as ``torch.argmax``).
"""

from __future__ import annotations

import torch

from pagedserve.kernels.triton_utils import cdiv, next_power_of_2, tl, triton

# Search passes at most: enough for plain bisection (one pivot) to reach adjacent float32
# values from any finite range.
MAX_SEARCH_PASSES = 64


@triton.jit
def _needed(tile_max_ptr, rows, n_tiles, tile, floor):
    """Whether any row's tile may hold a token at or above ``floor``: tiles wholly below it
    count for nothing above it and are not read."""
    return tl.max(tl.load(tile_max_ptr + rows * n_tiles + tile) - floor, axis=0) >= 0.0


@triton.jit
def _count_and_mass(logits_ptr, tile_max_ptr, rows, stride, V, n_tiles, t, m, inv_t,
                    BLOCK: tl.constexpr):
    """Per row: tokens with logit >= t, and their unnormalised mass exp((x - m) / T)."""
    count = tl.zeros([rows.shape[0], BLOCK], dtype=tl.int32)
    mass = tl.zeros([rows.shape[0], BLOCK], dtype=tl.float32)
    for tile in range(0, n_tiles):
        if _needed(tile_max_ptr, rows, n_tiles, tile, t):
            offs = tile * BLOCK + tl.arange(0, BLOCK)
            ptrs = logits_ptr + rows[:, None] * stride + offs[None, :]
            x = tl.load(ptrs, mask=offs[None, :] < V, other=float("-inf"))
            keep = x >= t[:, None]
            count += keep.to(tl.int32)
            mass += tl.where(keep, tl.exp((x - m[:, None]) * inv_t[:, None]), 0.0)
    return tl.sum(count, axis=1), tl.sum(mass, axis=1)


@triton.jit
def _pivot_pass(logits_ptr, tile_max_ptr, rows, stride, V, n_tiles, lo, hi, m, inv_t,
                BLOCK: tl.constexpr, PIVOTS: tl.constexpr):
    """One pass over the rows for PIVOTS thresholds evenly inside (lo, hi): the thresholds
    [ROWS, PIVOTS], ascending, and per threshold the count and mass of tokens at or above it.
    A pass narrows a search PIVOTS + 1 times for the price of one read of the row."""
    cols = tl.arange(0, PIVOTS)
    mids = lo[:, None] + (hi - lo)[:, None] * ((cols[None, :] + 1).to(tl.float32) / (PIVOTS + 1))
    counts = tl.zeros([rows.shape[0], PIVOTS], dtype=tl.int32)
    masses = tl.zeros([rows.shape[0], PIVOTS], dtype=tl.float32)
    for tile in range(0, n_tiles):
        # Every pivot is above lo: a tile below it counts for none of them.
        if _needed(tile_max_ptr, rows, n_tiles, tile, lo):
            offs = tile * BLOCK + tl.arange(0, BLOCK)
            ptrs = logits_ptr + rows[:, None] * stride + offs[None, :]
            x = tl.load(ptrs, mask=offs[None, :] < V, other=float("-inf"))
            e = tl.exp((x - m[:, None]) * inv_t[:, None])
            for j in tl.static_range(PIVOTS):
                mid = tl.sum(tl.where(cols[None, :] == j, mids, 0.0), axis=1)
                keep = x >= mid[:, None]
                c = tl.sum(keep.to(tl.int32), axis=1)
                s = tl.sum(tl.where(keep, e, 0.0), axis=1)
                counts += tl.where(cols[None, :] == j, c[:, None], 0)
                masses += tl.where(cols[None, :] == j, s[:, None], 0.0)
    return mids, counts, masses


@triton.jit
def _sample_kernel(
    logits_ptr, stride, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, key_ptr, position_ptr,
    out_ptr, threshold_ptr, tile_max_ptr, N, V, n_tiles,
    FILTER: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, MAX_STEPS: tl.constexpr,
    PIVOTS: tl.constexpr,
):
    """ROWS rows per program, every per-row quantity a [ROWS] vector (one row per program on
    the device's large vocabularies; many under the interpreter)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < N
    # Rows past the end repeat row 0 (no NaNs from empty rows) and store nothing.
    rows = tl.where(row_ok, rows, 0).to(tl.int64)
    neg_inf = tl.full([ROWS], float("-inf"), dtype=tl.float32)

    # Pass 1: the maximum (first index on ties), the smallest finite logit, the finite count,
    # and each tile's maximum, which lets every later pass skip the tiles below its interest.
    m = neg_inf
    best = tl.zeros([ROWS], dtype=tl.int64)
    lowest = tl.full([ROWS], float("inf"), dtype=tl.float32)
    finite = tl.zeros([ROWS], dtype=tl.int32)
    for tile in range(0, n_tiles):
        start = tile * BLOCK
        offs = start + tl.arange(0, BLOCK)
        ptrs = logits_ptr + rows[:, None] * stride + offs[None, :]
        x = tl.load(ptrs, mask=offs[None, :] < V, other=float("-inf"))
        tile_max = tl.max(x, axis=1)
        tl.store(tile_max_ptr + rows * n_tiles + tile, tile_max)
        tile_arg = tl.argmax(x, axis=1)
        best = tl.where(tile_max > m, start + tile_arg, best)
        m = tl.maximum(m, tile_max)
        is_finite = x > float("-inf")
        lowest = tl.minimum(lowest, tl.min(tl.where(is_finite, x, float("inf")), axis=1))
        finite += tl.sum(is_finite.to(tl.int32), axis=1)

    temperature = tl.load(temperature_ptr + rows, mask=row_ok, other=0.0)
    greedy = temperature <= 0.0
    inv_t = 1.0 / tl.where(greedy, 1.0, temperature)
    threshold = lowest
    if FILTER:
        k = tl.load(top_k_ptr + rows, mask=row_ok, other=1)
        count_max, mass_max = _count_and_mass(
            logits_ptr, tile_max_ptr, rows, stride, V, n_tiles, m, m, inv_t, BLOCK)
        # top-k: the largest t with count(x >= t) >= k; the maximum when its ties suffice.
        threshold = tl.where((k < finite) & (count_max >= k), m, threshold)
        search = ~greedy & (k < finite) & (count_max < k)
        lo = lowest
        hi = m
        steps = 0
        while (steps < MAX_STEPS) & (tl.sum(search.to(tl.int32), axis=0) > 0):
            mids, counts, _ = _pivot_pass(
                logits_ptr, tile_max_ptr, rows, stride, V, n_tiles, lo, hi, m, inv_t, BLOCK, PIVOTS)
            inside = (mids > lo[:, None]) & (mids < hi[:, None])
            search &= tl.sum(inside.to(tl.int32), axis=1) > 0
            enough = counts >= k[:, None]
            # Counts fall as the threshold rises: the largest pivot with enough is the new lo,
            # the smallest without the new hi; a pivot with exactly k settles the set.
            lo = tl.where(search, tl.maximum(lo, tl.max(tl.where(enough, mids, float("-inf")), axis=1)), lo)
            hi = tl.where(search, tl.minimum(hi, tl.min(tl.where(enough, float("inf"), mids), axis=1)), hi)
            search &= tl.sum((counts == k[:, None]).to(tl.int32), axis=1) == 0
            steps += 1
        threshold = tl.where(~greedy & (k < finite) & (count_max < k), lo, threshold)

        # top-p over the top-k set: the largest t >= threshold whose mass reaches p * Z_k.
        p = tl.load(top_p_ptr + rows, mask=row_ok, other=1.0)
        count_lo, z = _count_and_mass(
            logits_ptr, tile_max_ptr, rows, stride, V, n_tiles, threshold, m, inv_t, BLOCK)
        target = p * z
        on = ~greedy & (p < 1.0)
        threshold = tl.where(on & (mass_max >= target), m, threshold)
        search = on & (mass_max < target) & (count_lo > count_max + 1)
        lo = threshold
        hi = m
        c_lo = count_lo
        c_hi = count_max
        steps = 0
        while (steps < MAX_STEPS) & (tl.sum(search.to(tl.int32), axis=0) > 0):
            mids, counts, masses = _pivot_pass(
                logits_ptr, tile_max_ptr, rows, stride, V, n_tiles, lo, hi, m, inv_t, BLOCK, PIVOTS)
            inside = (mids > lo[:, None]) & (mids < hi[:, None])
            search &= tl.sum(inside.to(tl.int32), axis=1) > 0
            reach = masses >= target[:, None]
            # Mass falls as the threshold rises: the largest pivot that still reaches the target
            # is the new lo (its count the fewest among those), the smallest that does not the
            # new hi. One token between them settles the set.
            any_reach = tl.sum(reach.to(tl.int32), axis=1) > 0
            any_short = tl.sum((~reach).to(tl.int32), axis=1) > 0
            up = search & any_reach
            down = search & any_short
            lo = tl.where(up, tl.max(tl.where(reach, mids, float("-inf")), axis=1), lo)
            c_lo = tl.where(up, tl.min(tl.where(reach, counts, 2147483647), axis=1), c_lo)
            hi = tl.where(down, tl.min(tl.where(reach, float("inf"), mids), axis=1), hi)
            c_hi = tl.where(down, tl.max(tl.where(reach, -1, counts), axis=1), c_hi)
            search &= c_lo > c_hi + 1
            steps += 1
        threshold = tl.where(on & (mass_max < target) & (count_lo > count_max + 1), lo, threshold)

        # min-p: p_i >= min_p * p_max, i.e. x >= m + T log(min_p).
        min_p = tl.load(min_p_ptr + rows, mask=row_ok, other=0.0)
        min_p_cut = m + temperature * tl.log(tl.where(min_p > 0.0, min_p, 1.0))
        threshold = tl.where(~greedy & (min_p > 0.0), tl.maximum(threshold, min_p_cut), threshold)

    # The race: argmax of x / T - log(E) over the kept tokens, E = -log(U), U in (0, 1).
    key = tl.load(key_ptr + rows, mask=row_ok, other=0)
    position = tl.load(position_ptr + rows, mask=row_ok, other=0)
    best_score = neg_inf
    drawn = best
    kept_min = tl.full([ROWS], float("inf"), dtype=tl.float32)
    # Greedy rows take part with no kept token (threshold +inf).
    floor = tl.where(greedy, float("inf"), threshold)
    if tl.sum((~greedy).to(tl.int32), axis=0) > 0:
        for tile in range(0, n_tiles):
            if _needed(tile_max_ptr, rows, n_tiles, tile, floor):
                start = tile * BLOCK
                offs = start + tl.arange(0, BLOCK)
                ptrs = logits_ptr + rows[:, None] * stride + offs[None, :]
                valid = offs[None, :] < V
                x = tl.load(ptrs, mask=valid, other=float("-inf"))
                counter = (position[:, None] << 32) | offs[None, :].to(tl.int64)
                bits = tl.randint(key[:, None], counter)
                u = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
                kept = valid & (x >= threshold[:, None])
                score = (x - m[:, None]) * inv_t[:, None] - tl.log(-tl.log(u))
                score = tl.where(kept, score, float("-inf"))
                tile_best = tl.max(score, axis=1)
                tile_arg = tl.argmax(score, axis=1)
                drawn = tl.where(tile_best > best_score, start + tile_arg, drawn)
                best_score = tl.maximum(best_score, tile_best)
                kept_min = tl.minimum(kept_min, tl.min(tl.where(kept, x, float("inf")), axis=1))
    tl.store(out_ptr + rows, tl.where(greedy, best, drawn), mask=row_ok)
    tl.store(threshold_ptr + rows, tl.where(greedy, m, kept_min), mask=row_ok)


def sample_rows(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    keys: torch.Tensor,
    positions: torch.Tensor,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    min_p: torch.Tensor | None = None,
    block: int = 4096,
    pivots: int = 2,
    rows_per_program: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled token ids [N] int64 and each row's smallest kept logit [N] fp32 (the tokens at
    or above it were the candidates; the row's maximum for greedy rows).

    ``logits`` [N, V] fp32 (processed: penalties and bans already applied, -inf allowed);
    ``temperature`` [N] fp32, 0 for greedy; ``keys`` [N] int64, the Philox key of each row;
    ``positions`` [N] int64, the index of the token being drawn (the counter's high word);
    ``top_k`` [N] int64 (vocab size or more: off), ``top_p`` [N] fp32 (1: off), ``min_p`` [N]
    fp32 (0: off), each None when off for every row.
    """
    n, vocab = logits.shape
    assert logits.dtype == torch.float32 and logits.stride(1) == 1
    out = torch.empty(n, dtype=torch.int64, device=logits.device)
    thresholds = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return out, thresholds
    filtered = top_k is not None or top_p is not None or min_p is not None
    if top_k is None:
        top_k = torch.full((n,), vocab, dtype=torch.int64, device=logits.device)
    if top_p is None:
        top_p = torch.ones(n, dtype=torch.float32, device=logits.device)
    if min_p is None:
        min_p = torch.zeros(n, dtype=torch.float32, device=logits.device)
    block = min(block, next_power_of_2(vocab))
    # One row per program on the device (a program skips the tiles its row does not need);
    # under the interpreter, whole tiles of rows at once unless told otherwise.
    rows = rows_per_program or (1 if logits.is_cuda else max(1, min(1024, 65536 // block)))
    n_tiles = cdiv(vocab, block)
    tile_max = torch.empty(n, n_tiles, dtype=torch.float32, device=logits.device)
    _sample_kernel[(cdiv(n, rows),)](
        logits, logits.stride(0), temperature, top_k, top_p, min_p, keys,
        positions, out, thresholds, tile_max, n, vocab, n_tiles,
        FILTER=filtered, ROWS=rows, BLOCK=block, MAX_STEPS=MAX_SEARCH_PASSES, PIVOTS=pivots,
    )
    return out, thresholds


def kept_threshold(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    min_p: torch.Tensor | None = None,
) -> torch.Tensor:
    """The torch reference of the kept set: per row, the smallest kept logit (fp32 [N]), from a
    full sort. Rows with temperature 0 keep only their maximum."""
    n, vocab = logits.shape
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).unsqueeze(1)
    sorted_x = logits.sort(dim=-1, descending=True).values
    keep = sorted_x > float("-inf")
    if top_k is not None:
        kth = sorted_x.gather(1, (top_k.clamp(1, vocab) - 1).long().unsqueeze(1))
        keep &= sorted_x >= kth
    probs = torch.softmax((sorted_x / t).masked_fill(~keep, float("-inf")), dim=-1)
    if top_p is not None:
        # The first sorted token whose cumulative mass reaches p is the last one kept.
        before = probs.cumsum(dim=-1) - probs
        cut_value = sorted_x.masked_fill(~(before < top_p.unsqueeze(1)) | ~keep, float("inf"))
        keep &= sorted_x >= cut_value.min(dim=-1, keepdim=True).values
    if min_p is not None:
        keep &= probs >= min_p.unsqueeze(1) * probs[:, :1]
    smallest = sorted_x.masked_fill(~keep, float("inf")).min(dim=-1).values
    return torch.where(temperature > 0, smallest, sorted_x[:, 0])
