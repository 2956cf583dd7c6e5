"""Paged KV-cache blocks: allocation, reference counts and automatic prefix caching.

Every sequence owns a block table (a list of block ids); token ``p`` lives in block
``table[p // block_size]``. A *full* block whose K/V are computed is registered under a chained
hash of all token ids up to its end, so a later request with the same prefix maps the same
physical block (ref count > 1) instead of recomputing it. A block whose ref count drops to zero
goes to the back of the free queue but keeps its hash: it can still be hit until it is handed out
again, oldest-freed first (LRU).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from pagedserve.backend.engine.request import Request

BlockHash = bytes


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


class BlockManager:
    """Owns the free list and the prefix-cache index; the scheduler asks it for room."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order (oldest first). Cached ones keep their hash until reused.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[BlockHash, int] = {}
        # Per-request chained hashes of its full blocks (computed once per block).
        self._hashes: dict[str, list[BlockHash]] = {}
        # Per-request count of leading full blocks already offered to the prefix index.
        self._registered: dict[str, int] = {}
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
    def _request_hashes(self, request: Request, num_full_blocks: int) -> list[BlockHash]:
        hashes = self._hashes.setdefault(request.request_id, [])
        bs = self.block_size
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            tokens = [request.token_at(j) for j in range(i * bs, (i + 1) * bs)]
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
        hashes = self._request_hashes(request, max_full)
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
        request.block_ids = hit_ids
        hit_tokens = len(hit_ids) * self.block_size
        self.prefix_cache_queries += num_tokens
        self.prefix_cache_hits += hit_tokens
        return hit_tokens

    def cache_full_blocks(self, request: Request, num_computed: int | None = None) -> None:
        """Register the request's full, computed blocks in the prefix index: those within its
        first ``num_computed`` tokens (default: all computed ones) whose ids the host knows."""
        if not self.enable_prefix_caching:
            return
        if num_computed is None:
            num_computed = request.num_computed_tokens
        num_full = min(num_computed, request.num_tokens) // self.block_size
        done = self._registered.get(request.request_id, 0)
        if num_full <= done:
            return
        hashes = self._request_hashes(request, num_full)
        self._registered[request.request_id] = num_full
        for i in range(done, num_full):
            block = self.blocks[request.block_ids[i]]
            if block.block_hash is None:
                h = hashes[i]
                if h in self._cached:
                    continue  # same content already cached in another block
                block.block_hash = h
                self._cached[h] = block.block_id

    # -- allocation ------------------------------------------------------------------------
    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Grow the request's block table to hold ``num_new_tokens`` more tokens.
        Returns False, changing nothing, if there are not enough free blocks."""
        total = request.num_computed_tokens + num_new_tokens
        if total <= len(request.block_ids) * self.block_size:
            return True  # the common decode step: room in its last block
        needed = self.blocks_needed(total) - len(request.block_ids)
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
        return True

    def free(self, request: Request) -> None:
        """Release the request's blocks; tail blocks are queued first so they are evicted
        before the shared prefix blocks."""
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self._free[block_id] = None
        request.block_ids = []
        self._registered.pop(request.request_id, None)

    def forget(self, request: Request) -> None:
        """Drop per-request bookkeeping once the request has finished."""
        self._hashes.pop(request.request_id, None)
