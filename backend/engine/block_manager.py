"""Paged KV-cache blocks: allocation, reference counts, automatic prefix caching, block table.

Every sequence owns a list of block ids; token ``p`` lives in block ``block_ids[p // block_size]``.
A *full* block whose K/V are computed is registered under a chained hash of all token ids up to
its end, so a later request with the same prefix maps the same physical block (ref count > 1)
instead of recomputing it. A block whose ref count drops to zero goes to the back of the free
queue but keeps its hash: it can still be hit until it is handed out again, oldest-freed first
(LRU).

With a model whose every layer attends through a sliding window of at most W keys (Mistral,
Mixtral, Phi-3-mini), a step whose first query sits at position q reads no key below
q - W + 1, and neither does any later step: the blocks wholly below it are released as the
request advances (``release_out_of_window``), so a long request holds about W / block_size + 1
blocks. They keep their hashes in the free queue, as any freed block does. A model with one
full-attention layer (Gemma 2 and 3 alternate) releases nothing: that layer reads every key.

The block manager is the only writer of a request's blocks, so it also keeps the block table:
one row per request that holds blocks, updated in the same call that changes the blocks. A step
then gathers the rows it needs with one fancy index instead of converting hundreds of Python
lists each step.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from pagedserve.backend.engine.request import Request

BlockHash = bytes
# ``Request.block_ids`` entry of a block released out of the attention window.
RELEASED_BLOCK = -1


def hash_block(parent: BlockHash | None, token_ids: list[int]) -> BlockHash:
    """Chained hash: a block's identity includes every token before it."""
    h = hashlib.blake2b(digest_size=16)
    if parent is not None:
        h.update(parent)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None


class BlockTable:
    """``[max_seqs, max_blocks_per_seq]`` block ids, a row per request holding blocks, padded
    with 0. Only requests that hold blocks have a row, and only running requests (plus the one
    being admitted) hold blocks, so ``max_seqs`` rows are enough."""

    def __init__(self, max_seqs: int, max_blocks_per_seq: int) -> None:
        self.table = np.zeros((max(1, max_seqs), max(1, max_blocks_per_seq)), dtype=np.int32)
        self._free_rows = list(range(self.table.shape[0] - 1, -1, -1))

    @property
    def max_blocks_per_seq(self) -> int:
        return int(self.table.shape[1])

    def append(self, request: Request, start: int) -> None:
        """Write ``request.block_ids[start:]`` into its row (taking a row first if needed)."""
        ids = request.block_ids
        if request.table_row < 0:
            if not self._free_rows:
                raise RuntimeError("block table is full: more requests hold blocks than max_seqs")
            request.table_row = self._free_rows.pop()
        self.table[request.table_row, start : len(ids)] = ids[start:]

    def release(self, request: Request, num_written: int) -> None:
        row = request.table_row
        if row >= 0:
            self.table[row, :num_written] = 0
            self._free_rows.append(row)
            request.table_row = -1

    def gather(self, rows: list[int], num_blocks: int) -> np.ndarray:
        """[len(rows), num_blocks] copy of the given rows."""
        return self.table[np.asarray(rows, dtype=np.int64), :num_blocks]


class BlockManager:
    """Owns the free list, the prefix-cache index and the block table; the scheduler asks it
    for room."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        max_seqs: int,
        max_blocks_per_seq: int,
        enable_prefix_caching: bool = True,
        attention_window: int | None = None,
    ) -> None:
        """``attention_window``: the keys the model's widest layer attends to when every layer
        has a sliding window (its own key included), else None (nothing is ever released)."""
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        if attention_window is not None and attention_window < 1:
            raise ValueError(f"attention_window must be positive, got {attention_window}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.attention_window = attention_window
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.block_table = BlockTable(max_seqs, max_blocks_per_seq)
        # Free blocks in eviction order (oldest first). Cached ones keep their hash until reused.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[BlockHash, int] = {}
        self.prefix_cache_queries = 0  # prompt tokens looked up
        self.prefix_cache_hits = 0  # prompt tokens found

    # -- queries ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache ----------------------------------------------------------------------
    def _hashes(self, request: Request, num_full_blocks: int) -> list[BlockHash]:
        hashes = request.block_hashes
        bs = self.block_size
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            tokens = request.token_slice(i * bs, (i + 1) * bs)
            hashes.append(hash_block(hashes[-1] if hashes else None, tokens))
        return hashes

    def match_prefix(self, request: Request) -> int:
        """Attach cached blocks for the longest cached prefix of a request that holds no
        blocks yet; returns the number of tokens they cover. At least one token is always left
        to compute, so the step still produces logits for the last position."""
        assert not request.block_ids
        if not self.enable_prefix_caching:
            return 0
        num_tokens = request.num_tokens
        max_full = (num_tokens - 1) // self.block_size
        hashes = self._hashes(request, max_full)
        hit_ids: list[int] = []
        for h in hashes[:max_full]:
            block_id = self._cached.get(h)
            if block_id is None:
                break
            hit_ids.append(block_id)
        for block_id in hit_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
        hit_tokens = len(hit_ids) * self.block_size
        self.prefix_cache_queries += num_tokens
        self.prefix_cache_hits += hit_tokens
        if hit_ids:
            request.block_ids = hit_ids
            self.block_table.append(request, 0)
        return hit_tokens

    def cache_full_blocks(self, request: Request, num_computed: int | None = None) -> None:
        """Register the request's full, computed blocks in the prefix index: those within its
        first ``num_computed`` tokens (default: all computed ones) whose ids the host knows."""
        if not self.enable_prefix_caching:
            return
        if num_computed is None:
            num_computed = request.num_computed_tokens
        num_full = min(num_computed, request.num_tokens) // self.block_size
        # Blocks released before they were registered here (shared ones a prompt source
        # registered) are skipped.
        done = max(request.num_registered_blocks, request.num_released_blocks)
        if num_full <= done:
            return
        hashes = self._hashes(request, num_full)
        request.num_registered_blocks = num_full
        for i in range(done, num_full):
            block = self.blocks[request.block_ids[i]]
            if block.block_hash is None:
                h = hashes[i]
                if h in self._cached:
                    continue  # same content already cached in another block
                block.block_hash = h
                self._cached[h] = block.block_id

    # -- shared prompts --------------------------------------------------------------------
    def _blocks_out_of_window(self, first_query: int) -> int:
        """Leading blocks that no query at ``first_query`` or later reads."""
        if self.attention_window is None:
            return 0
        return max(0, first_query - self.attention_window + 1) // self.block_size

    def release_out_of_window(self, request: Request) -> None:
        """Release the request's leading blocks below the window of its next step (which
        starts at ``num_computed_tokens``), registering them in the prefix index first. Safe
        with a step still running on the device: a block handed out again is written only by
        a later step, after it on the stream."""
        dead = min(self._blocks_out_of_window(request.num_computed_tokens), len(request.block_ids))
        first = request.num_released_blocks
        if dead <= first:
            return
        self.cache_full_blocks(request, dead * self.block_size)
        row = self.block_table.table[request.table_row]
        for i in range(first, dead):
            block = self.blocks[request.block_ids[i]]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block.block_id} freed twice"
            if block.ref_count == 0:
                self._free[block.block_id] = None
            request.block_ids[i] = RELEASED_BLOCK
            row[i] = 0  # never read: below every later query's window
        request.num_released_blocks = dead

    def shareable_prompt_blocks(self, request: Request) -> int:
        """The full blocks of the prompt that another request with the same prompt can map:
        every one but a block holding the last prompt token, which each request computes
        itself (its logits give its first token)."""
        return (request.num_prompt_tokens - 1) // self.block_size

    def can_share_prompt(self, source: Request, target: Request) -> bool:
        """Whether ``source`` still holds every shareable prompt block that ``target`` reads:
        those it released out of the window must be ones the target's first step (at the
        first unshared token) does not read either."""
        num_blocks = self.shareable_prompt_blocks(target)
        released = min(source.num_released_blocks, num_blocks)
        return released <= self._blocks_out_of_window(num_blocks * self.block_size)

    def share_prompt(self, source: Request, target: Request) -> int:
        """Map ``source``'s full prompt blocks into ``target`` (same prompt, holding no
        blocks), one more reference each; returns the tokens they cover. Full blocks never
        change once computed, so the requests need no copy: each writes only blocks of its own
        from its first unshared token on (the last, partial prompt block included). Blocks the
        source released out of its window are released for the target too (see
        ``can_share_prompt``)."""
        assert not target.block_ids
        assert source.prompt_token_ids == target.prompt_token_ids
        assert self.can_share_prompt(source, target)
        num_blocks = self.shareable_prompt_blocks(target)
        shared = source.block_ids[:num_blocks]
        assert len(shared) == num_blocks, "the source has not got its prompt blocks"
        released = min(source.num_released_blocks, num_blocks)
        for block_id in shared[released:]:
            self.blocks[block_id].ref_count += 1  # held by the source: not in the free queue
        target.block_ids = list(shared)
        target.num_released_blocks = released
        if not target.block_hashes:
            target.block_hashes = source.block_hashes[:num_blocks]
        self.block_table.append(target, 0)
        self.block_table.table[target.table_row, :released] = 0
        return num_blocks * self.block_size

    # -- allocation ------------------------------------------------------------------------
    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Grow the request's blocks to hold ``num_new_tokens`` more tokens.
        Returns False, changing nothing, if there are not enough free blocks."""
        total = request.num_computed_tokens + num_new_tokens
        held = len(request.block_ids)
        if total <= held * self.block_size:
            return True  # the common decode step: room in its last block
        if self.blocks_needed(total) > self.block_table.max_blocks_per_seq:
            raise ValueError(
                f"request {request.request_id} would hold {self.blocks_needed(total)} blocks; "
                f"rows hold {self.block_table.max_blocks_per_seq}"
            )
        needed = self.blocks_needed(total) - held
        if needed > len(self._free):
            return False
        for _ in range(needed):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:  # evict the stale cache entry
                if self._cached.get(block.block_hash) == block_id:
                    del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_count = 1
            request.block_ids.append(block_id)
        self.block_table.append(request, held)
        return True

    def discard_tail(self, request: Request, num_tokens: int) -> None:
        """Give back the request's blocks past its first ``num_tokens`` tokens: those that held
        only draft tokens the target model rejected. Such blocks were allocated for the step
        that verified them and never registered (registration stops at the known tokens)."""
        keep = self.blocks_needed(num_tokens)
        tail = request.block_ids[keep:]
        if not tail:
            return
        for block_id in reversed(tail):
            block = self.blocks[block_id]
            assert block.ref_count == 1 and block.block_hash is None, f"block {block_id} is shared"
            block.ref_count = 0
            self._free[block_id] = None
        del request.block_ids[keep:]
        self.block_table.table[request.table_row, keep : keep + len(tail)] = 0

    def free(self, request: Request) -> None:
        """Release the request's blocks and its table row; tail blocks are queued first so
        they are evicted before the shared prefix blocks. Its hashes stay with the request (a
        preempted request reuses them when it is admitted again)."""
        for block_id in reversed(request.block_ids[request.num_released_blocks :]):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self._free[block_id] = None
        self.block_table.release(request, len(request.block_ids))
        request.block_ids = []
        request.num_released_blocks = 0
        request.num_registered_blocks = 0
