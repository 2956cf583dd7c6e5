"""Greedy output of the whole engine equals transformers' generate with the same weights.

The KV pool is small enough to force preemption and the token budget small enough to force
chunked prefill, with prompts of 1 to 300 tokens submitted together.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve import LLM, SamplingParams
from tests.backend.engine.reference import compare_greedy, hf_greedy

PROMPT_LENGTHS = [1, 2, 3, 5, 8, 13, 17, 31, 47, 64, 90, 128, 160, 200, 250, 300]


def mixed_prompts(tokenizer, seed: int = 0, lengths: list[int] = PROMPT_LENGTHS) -> list[list[int]]:
    """Real text for the model to continue, cut to each length (random ids pad short texts)."""
    rng = random.Random(seed)
    text = (
        "The history of the city begins with a small settlement on the river. Over the "
        "centuries merchants, farmers and scholars arrived, and the town grew into a centre "
        "of trade and learning. Its university was founded in the twelfth century. "
    ) * 12
    base = tokenizer.encode(text, add_special_tokens=False)
    prompts = []
    for n in lengths:
        start = rng.randrange(0, len(base) - n)
        prompts.append(base[start : start + n])
    return prompts


def run_and_compare(
    model_dir, max_new_tokens: int, num_blocks: int, budget: int,
    prompt_lengths: list[int] = PROMPT_LENGTHS, expect_preemption: bool = True, **engine_kwargs,
) -> None:
    llm = LLM(
        str(model_dir), dtype="float32", device="cpu", block_size=16, num_blocks=num_blocks,
        max_num_batched_tokens=budget, max_num_seqs=16, **engine_kwargs,
    )
    prompts = mixed_prompts(llm.tokenizer, lengths=prompt_lengths)
    outs = llm.generate(
        prompt_token_ids=prompts, sampling_params=SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    )
    engine = llm.engine
    if expect_preemption:
        assert engine.scheduler.num_preemptions > 0, "the pool was meant to force preemption"
    assert engine.block_manager.num_free_blocks == num_blocks

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    eos = engine.model_info.eos_token_ids
    refs = [hf_greedy(hf, p, max_new_tokens, eos) for p in prompts]
    ties = compare_greedy([o.token_ids for o in outs], refs)
    print(f"near-ties met: {ties}")
    assert ties <= 2


def test_tiny_qwen2_matches_transformers(tiny_qwen2_dir) -> None:
    # 300 + 20 tokens need 20 blocks; all 16 requests together need ~100.
    run_and_compare(tiny_qwen2_dir, max_new_tokens=20, num_blocks=32, budget=64)


def test_tiny_llama_matches_transformers(tiny_llama_dir) -> None:
    run_and_compare(tiny_llama_dir, max_new_tokens=20, num_blocks=32, budget=48)


@pytest.mark.slow
def test_default_model_matches_transformers(default_model_dir) -> None:
    run_and_compare(default_model_dir, max_new_tokens=16, num_blocks=40, budget=96)
