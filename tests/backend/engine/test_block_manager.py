"""Block manager: allocation, ref counts, prefix caching with chained hashes, LRU reuse."""

from __future__ import annotations

from pagedserve.backend.engine.block_manager import BlockManager, hash_block
from pagedserve.backend.engine.request import Request
from pagedserve.backend.sampling_params import SamplingParams


def manager(num_blocks: int, block_size: int, **kwargs) -> BlockManager:
    return BlockManager(num_blocks, block_size, max_seqs=8, max_blocks_per_seq=64, **kwargs)


def make_request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4))


def compute(bm: BlockManager, req: Request, n: int) -> None:
    """Simulate a step that computes n more tokens of req."""
    assert bm.allocate_slots(req, n)
    req.num_computed_tokens += n
    bm.cache_full_blocks(req)


def test_chained_hash_depends_on_prefix() -> None:
    a = hash_block(None, [1, 2, 3])
    assert hash_block(a, [4, 5, 6]) != hash_block(hash_block(None, [9, 9, 9]), [4, 5, 6])
    assert hash_block(None, [1, 2, 3]) == a


def test_allocate_and_free_restore_every_block() -> None:
    bm = manager(8, 4)
    req = make_request("a", list(range(10)))
    assert bm.allocate_slots(req, 10)
    assert len(req.block_ids) == 3 and bm.num_free_blocks == 5
    assert not bm.allocate_slots(make_request("b", list(range(40))), 40)  # 10 blocks > 5 free
    bm.free(req)
    assert bm.num_free_blocks == 8 and req.block_ids == []


def test_prefix_hit_shares_blocks_and_counts() -> None:
    bm = manager(16, 4)
    prefix = list(range(100, 112))  # three full blocks
    a = make_request("a", prefix + [1, 2])
    assert bm.match_prefix(a) == 0
    compute(bm, a, a.num_tokens)
    b = make_request("b", prefix + [7, 8, 9])
    hit = bm.match_prefix(b)
    assert hit == 12
    assert b.block_ids == a.block_ids[:3]
    assert all(bm.blocks[i].ref_count == 2 for i in b.block_ids)
    assert bm.prefix_cache_hits == 12 and bm.prefix_cache_queries == a.num_tokens + b.num_tokens


def test_full_prompt_hit_leaves_one_token_to_compute() -> None:
    bm = manager(16, 4)
    a = make_request("a", list(range(8)))
    compute(bm, a, 8)
    bm.free(a)
    b = make_request("b", list(range(8)))
    assert bm.match_prefix(b) == 4  # the last block is recomputed for its logits


def test_freed_cached_blocks_are_reused_lru_and_evicted_on_reallocation() -> None:
    bm = manager(4, 2)
    a = make_request("a", [1, 2, 3, 4, 5])
    compute(bm, a, 5)
    bm.free(a)
    assert bm.num_free_blocks == 4
    # A request with the same prefix still hits the freed (cached) blocks.
    b = make_request("b", [1, 2, 3, 4, 9])
    assert bm.match_prefix(b) == 4
    bm.free(b)
    # Filling the whole pool with other content evicts them.
    c = make_request("c", [7] * 8)
    assert bm.allocate_slots(c, 8)
    bm.free(c)
    d = make_request("d", [1, 2, 3, 4, 9])
    assert bm.match_prefix(d) == 0


def test_prefix_caching_disabled() -> None:
    bm = manager(8, 4, enable_prefix_caching=False)
    a = make_request("a", list(range(9)))
    compute(bm, a, 9)
    b = make_request("b", list(range(9)))
    assert bm.match_prefix(b) == 0
