"""Persistent block-table rows: every step's gathered table equals the one built from scratch
out of the requests' block lists, through growth, preemption, prefix hits and row reuse."""

from __future__ import annotations

import random

import numpy as np
import pytest

from pagedserve.backend.engine.block_manager import BlockManager
from pagedserve.backend.engine.request import Request
from pagedserve.backend.runner.block_table import PersistentBlockTables
from pagedserve.backend.sampling_params import SamplingParams

BLOCK_SIZE = 4


def table_from_lists(requests: list[Request], num_blocks: int) -> np.ndarray:
    """The reference: zero-padded rows written from each request's block list."""
    table = np.zeros((len(requests), num_blocks), dtype=np.int32)
    for i, req in enumerate(requests):
        table[i, : len(req.block_ids)] = req.block_ids
    return table


def gathered(tables: PersistentBlockTables, requests: list[Request]) -> np.ndarray:
    num_blocks = max(len(r.block_ids) for r in requests)
    return tables.gather([tables.row_of(r) for r in requests], num_blocks)


@pytest.mark.parametrize("seed", range(6))
def test_rows_match_the_block_lists_under_random_steps(seed: int) -> None:
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=64, block_size=BLOCK_SIZE)
    # Fewer rows than live requests at times: the table must grow.
    tables = PersistentBlockTables(num_rows=2, max_blocks_per_seq=32)
    shared_prefix = [rng.randrange(100) for _ in range(3 * BLOCK_SIZE)]
    live: list[Request] = []
    next_id = 0
    for _ in range(200):
        action = rng.random()
        if action < 0.25 and len(live) < 8:  # admit, often with a cached prefix
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
            req = live.pop(rng.randrange(len(live)))
            bm.free(req)
            bm.forget(req)
            tables.release(req.request_id)
        for req in live:  # one step: everyone computes some tokens
            n = rng.choice([1, 1, 1, 3, 6])
            if req.num_computed_tokens + n <= 30 * BLOCK_SIZE and bm.allocate_slots(req, n):
                req.num_computed_tokens += n
                req.output_token_ids.extend(rng.randrange(100) for _ in range(n))
                bm.cache_full_blocks(req)
        stepping = [r for r in live if r.block_ids]
        if stepping:
            rng.shuffle(stepping)  # a step's order is not the admission order
            assert np.array_equal(
                gathered(tables, stepping),
                table_from_lists(stepping, max(len(r.block_ids) for r in stepping)),
            )


def test_a_released_row_is_clean_for_its_next_owner() -> None:
    tables = PersistentBlockTables(num_rows=1, max_blocks_per_seq=8)
    first = Request("a", [1], SamplingParams())
    first.block_ids = [5, 6, 7, 8]
    tables.row_of(first)
    tables.release("a")
    second = Request("b", [1], SamplingParams())
    second.block_ids = [9]
    row = tables.row_of(second)
    assert tables.table[row].tolist() == [9, 0, 0, 0, 0, 0, 0, 0]


def test_a_shrunk_list_clears_the_old_tail() -> None:
    tables = PersistentBlockTables(num_rows=1, max_blocks_per_seq=6)
    req = Request("a", [1], SamplingParams())
    req.block_ids = [1, 2, 3, 4]
    tables.row_of(req)
    del req.block_ids[2:]  # the same list object, shorter
    assert tables.gather([tables.row_of(req)], 4).tolist() == [[1, 2, 0, 0]]


def test_more_blocks_than_a_row_holds_is_an_error() -> None:
    tables = PersistentBlockTables(num_rows=1, max_blocks_per_seq=2)
    req = Request("a", [1], SamplingParams())
    req.block_ids = [1, 2, 3]
    with pytest.raises(ValueError, match="3 blocks"):
        tables.row_of(req)
