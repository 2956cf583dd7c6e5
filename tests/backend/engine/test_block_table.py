"""The block manager's block table: after every change, each request's row equals its block
list (zero-padded), through growth, preemption, prefix hits and row reuse."""

from __future__ import annotations

import random

import numpy as np
import pytest

from pagedserve.backend.engine.block_manager import BlockManager
from pagedserve.backend.engine.request import Request
from pagedserve.backend.sampling_params import SamplingParams

BLOCK_SIZE = 4
MAX_SEQS = 8
ROW_BLOCKS = 32


def table_from_lists(requests: list[Request], num_blocks: int) -> np.ndarray:
    """The reference: zero-padded rows written from each request's block list."""
    table = np.zeros((len(requests), num_blocks), dtype=np.int32)
    for i, req in enumerate(requests):
        table[i, : len(req.block_ids)] = req.block_ids
    return table


def manager(num_blocks: int = 64) -> BlockManager:
    return BlockManager(
        num_blocks, BLOCK_SIZE, max_seqs=MAX_SEQS, max_blocks_per_seq=ROW_BLOCKS
    )


@pytest.mark.parametrize("seed", range(6))
def test_rows_match_the_block_lists_under_random_steps(seed: int) -> None:
    rng = random.Random(seed)
    bm = manager()
    shared_prefix = [rng.randrange(100) for _ in range(3 * BLOCK_SIZE)]
    live: list[Request] = []
    next_id = 0
    for _ in range(200):
        action = rng.random()
        if action < 0.25 and len(live) < MAX_SEQS:  # admit, often with a cached prefix
            prompt = (shared_prefix if rng.random() < 0.5 else []) + [
                rng.randrange(100) for _ in range(rng.randrange(1, 9))
            ]
            req = Request(f"r{next_id}", prompt, SamplingParams(max_tokens=64))
            next_id += 1
            req.num_computed_tokens = bm.match_prefix(req)
            live.append(req)
        elif action < 0.35 and live:  # preempt: blocks freed, recomputed later
            req = rng.choice(live)
            bm.free(req)
            req.num_computed_tokens = bm.match_prefix(req)
        elif action < 0.45 and live:  # finish
            bm.free(live.pop(rng.randrange(len(live))))
        for req in live:  # one step: everyone computes some tokens
            n = rng.choice([1, 1, 1, 3, 6])
            if req.num_computed_tokens + n <= 30 * BLOCK_SIZE and bm.allocate_slots(req, n):
                req.num_computed_tokens += n
                req.output_token_ids.extend(rng.randrange(100) for _ in range(n))
                bm.cache_full_blocks(req)
        holding = [r for r in live if r.block_ids]
        assert all(r.table_row >= 0 for r in holding)
        assert all(r.table_row == -1 for r in live if not r.block_ids)
        assert len({r.table_row for r in holding}) == len(holding), "two requests share a row"
        if holding:
            rng.shuffle(holding)  # a step's order is not the admission order
            gathered = bm.block_table.gather([r.table_row for r in holding], ROW_BLOCKS)
            assert np.array_equal(gathered, table_from_lists(holding, ROW_BLOCKS))


def test_a_released_row_is_clean_for_its_next_owner() -> None:
    bm = BlockManager(16, BLOCK_SIZE, max_seqs=1, max_blocks_per_seq=8)
    first = Request("a", [1] * 16, SamplingParams())
    assert bm.allocate_slots(first, 16)
    row = first.table_row
    bm.free(first)
    assert first.table_row == -1
    second = Request("b", [2], SamplingParams())
    assert bm.allocate_slots(second, 1)
    assert second.table_row == row
    assert bm.block_table.table[row].tolist() == [second.block_ids[0]] + [0] * 7


def test_more_blocks_than_a_row_holds_is_an_error() -> None:
    bm = BlockManager(16, BLOCK_SIZE, max_seqs=1, max_blocks_per_seq=2)
    req = Request("a", [1] * 12, SamplingParams())
    with pytest.raises(ValueError, match="3 blocks"):
        bm.allocate_slots(req, 12)
    assert req.block_ids == [] and bm.num_free_blocks == 16  # nothing taken
