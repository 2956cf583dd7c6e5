"""Parallel sampling in the engine: ``n`` choices of one prompt prefill it once and map its
blocks, and still equal ``n`` separate requests seeded ``seed .. seed + n - 1``."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import replace

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.backend.engine.core import EngineCore
from pagedserve.backend.engine.request import Request
from pagedserve.backend.server.choices import choice_request_id

BLOCK_SIZE = 16
PROMPT_LEN = 1000  # 62 full blocks to share, the 63rd holds the last 8 prompt tokens
MAX_TOKENS = 8
SEED = 1234


@pytest.fixture(scope="module")
def llm(tiny_llama_dir) -> LLM:
    # No prefix cache: whatever is shared here is shared by the choices themselves.
    return LLM(
        str(tiny_llama_dir), device="cpu", block_size=BLOCK_SIZE, num_blocks=300,
        max_num_batched_tokens=512, enable_prefix_caching=False,
    )


@pytest.fixture(autouse=True)
def all_blocks_free_after(llm):
    yield
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "a test left KV blocks allocated"
    assert not llm.engine.requests


def prompt() -> list[int]:
    rng = random.Random(7)
    return [rng.randrange(3, 49152) for _ in range(PROMPT_LEN)]


def choices(engine: EngineCore, n: int, params: SamplingParams, share: bool) -> list[Request]:
    requests = []
    for i in range(n):
        request = engine.builder.build(
            prompt_token_ids=prompt(), params=replace(params, seed=SEED + i),
            request_id=choice_request_id("req", i),
        )
        if share and i > 0:
            request.prompt_source_id = "req"
        requests.append(request)
    return requests


def run(engine: EngineCore, requests: list[Request]) -> tuple[dict[str, list[int]], int, int]:
    """Every request's tokens, the prompt tokens the steps computed and the most blocks held."""
    for request in requests:
        engine.add(request)
    tokens: dict[str, list[int]] = defaultdict(list)
    prefill_tokens = peak_blocks = 0
    bm = engine.block_manager
    while engine.has_unfinished():
        for delta in engine.step():
            tokens[delta.request_id] += delta.token_ids
        assert engine.last_step is not None
        prefill_tokens += engine.last_step.num_prefill_tokens
        peak_blocks = max(peak_blocks, bm.num_blocks - bm.num_free_blocks)
    return tokens, prefill_tokens, peak_blocks


def test_four_choices_prefill_the_prompt_once_and_equal_four_seeded_requests(llm) -> None:
    engine = llm.engine
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, top_p=0.9, ignore_eos=True)
    shared, prefill_tokens, peak_blocks = run(engine, choices(engine, 4, params, share=True))

    full = (PROMPT_LEN - 1) // BLOCK_SIZE * BLOCK_SIZE  # 992 tokens in 62 full blocks
    assert prefill_tokens == PROMPT_LEN + 3 * (PROMPT_LEN - full)
    # Each choice ends holding ceil(1007 / 16) = 63 blocks; the 62 shared ones count once.
    own = -(-(PROMPT_LEN + MAX_TOKENS - 1) // BLOCK_SIZE) - full // BLOCK_SIZE
    assert peak_blocks == full // BLOCK_SIZE + 4 * own

    separate = {}
    for request in choices(engine, 4, params, share=False):
        separate.update(run(engine, [request])[0])
    assert shared == separate
    assert len({tuple(t) for t in shared.values()}) == 4, "four seeds, four different choices"


def test_choices_of_an_aborted_source_still_finish(llm) -> None:
    engine = llm.engine
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    requests = choices(engine, 3, params, share=True)
    for request in requests:
        engine.add(request)
    engine.step()  # the source's first chunk: the others are held for its full blocks
    assert len(engine.scheduler.held) == 2
    engine.abort("req")
    tokens, _, _ = run(engine, [])
    alone, _, _ = run(engine, choices(engine, 1, params, share=False))
    assert tokens == {"req-1": alone["req"], "req-2": alone["req"]}
