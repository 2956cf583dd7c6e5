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


# -- sliding windows ---------------------------------------------------------------------------
def test_blocks_below_the_window_are_released_as_the_request_advances() -> None:
    # Window of 6 keys, blocks of 4: a step whose first query is at q reads keys q - 5 on.
    bm = manager(16, 4, attention_window=6)
    req = make_request("a", list(range(30)))
    compute(bm, req, 9)  # positions 0-8 in blocks 0-2
    ids = list(req.block_ids)
    bm.release_out_of_window(req)  # next query 9 reads keys 4 on: block 0 is dead
    assert req.block_ids == [-1, ids[1], ids[2]] and req.num_released_blocks == 1
    assert bm.blocks[ids[0]].ref_count == 0 and bm.num_free_blocks == 14
    assert bm.block_table.table[req.table_row, :3].tolist() == [0, ids[1], ids[2]]
    bm.release_out_of_window(req)  # idempotent
    assert bm.num_free_blocks == 14
    compute(bm, req, 4)  # next query 13 reads keys 8 on: blocks 0 and 1 are dead
    bm.release_out_of_window(req)
    assert req.block_ids[:2] == [-1, -1] and req.num_released_blocks == 2
    # 15 of 16 blocks free again after a full free; no block is freed twice.
    bm.free(req)
    assert bm.num_free_blocks == 16 and req.num_released_blocks == 0
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_nothing_is_released_without_a_window() -> None:
    bm = manager(16, 4)
    req = make_request("a", list(range(30)))
    compute(bm, req, 29)
    bm.release_out_of_window(req)
    assert req.num_released_blocks == 0 and -1 not in req.block_ids


def test_released_blocks_stay_in_the_prefix_cache() -> None:
    """A released block was registered first: a later request with the same prefix maps it,
    even when the releasing request registered nothing itself yet."""
    bm = manager(16, 4, attention_window=4)
    prompt = list(range(100, 120))
    a = make_request("a", prompt)
    assert bm.allocate_slots(a, 16)
    a.num_computed_tokens = 16  # launched; nothing registered yet
    released = a.block_ids[:3]
    bm.release_out_of_window(a)  # next query 16 reads keys 13 on: blocks 0-2 dead
    assert a.num_released_blocks == 3 and a.num_registered_blocks == 3
    b = make_request("b", prompt)
    assert bm.match_prefix(b) == 12  # blocks 0-2 from the free queue (block 3 not registered)
    assert b.block_ids == released


def test_a_shared_prompt_keeps_what_the_sharer_reads() -> None:
    bm = manager(32, 4, attention_window=6)
    prompt = list(range(200, 222))  # 22 tokens: 5 full blocks shareable
    source = make_request("s", prompt)
    compute(bm, source, 22)
    target = make_request("t", prompt)
    # The target's first step is at token 20 and reads keys 15 on: blocks 0-2 are dead for it.
    bm.release_out_of_window(source)  # next query 22 reads keys 17 on: blocks 0-3 dead
    assert source.num_released_blocks == 4
    assert not bm.can_share_prompt(source, target)  # block 3 is gone but the target reads it
    source2 = make_request("s2", prompt)
    compute(bm, source2, 20)
    bm.release_out_of_window(source2)  # next query 20 reads keys 15 on: blocks 0-2 dead
    assert source2.num_released_blocks == 3 and bm.can_share_prompt(source2, target)
    assert bm.share_prompt(source2, target) == 20
    assert target.num_released_blocks == 3 and target.block_ids[:3] == [-1, -1, -1]
    assert target.block_ids[3:] == source2.block_ids[3:5]
    assert all(bm.blocks[i].ref_count == 2 for i in target.block_ids[3:])
    assert bm.block_table.table[target.table_row, :5].tolist() == [0, 0, 0, *target.block_ids[3:]]
    bm.free(target)
    assert all(bm.blocks[i].ref_count == 1 for i in source2.block_ids[3:5])
