"""Gemma 2, Gemma 3 (text) and Mistral with a sliding window against transformers: logits over
a paged schedule, then the engine's greedy tokens.

Each family runs a tiny random-weight checkpoint written by transformers with its quirks on and
a sliding window shorter than most prompts, off the 16-token block edges: Gemma 2's
local/global layers, attention and final-logit soft-capping (caps small enough to bite on a
tiny model's scores), query_pre_attn_scalar and head_dim both unlike hidden / heads; Gemma 3's
q/k norms, local and global RoPE bases with linear scaling on the global one (and an
attn_logit_softcapping that transformers' Gemma 3 ignores, so must we); Mistral windowing every
layer. Norm weights are random, so a (1 + w) norm read as w, or one misplaced, shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.backend.config import ModelConfig
from pagedserve.backend.errors import ModelLoadError
from pagedserve.backend.models.gemma2 import Gemma2ForCausalLM, GemmaRMSNorm
from pagedserve.backend.models.gemma3 import Gemma3ForCausalLM
from pagedserve.backend.models.layers import layer_sliding_window
from pagedserve.backend.models.llama import LlamaForCausalLM
from pagedserve.backend.models.loader import LoadedModel, load_model
from pagedserve.backend.runner.attention import TorchAttentionBackend
from tests.backend.engine.reference import compare_greedy, hf_greedy
from tests.backend.engine.test_engine_vs_transformers import run_and_compare
from tests.backend.models.conftest import (
    TINY_GEMMA2,
    TINY_GEMMA3,
    TINY_MISTRAL_WINDOWED,
    WINDOW,
    randomize_norms,
)
from tests.backend.models.paged_schedule import random_prompts
from tests.backend.models.test_llama_model import check_against_transformers

CPU = torch.device("cpu")
@pytest.fixture(scope="module")
def tiny_gemma2_dir(tiny_model_factory: Any) -> Path:
    return randomize_norms(tiny_model_factory("tiny-gemma2", TINY_GEMMA2))


@pytest.fixture(scope="module")
def tiny_gemma3_dir(tiny_model_factory: Any) -> Path:
    return randomize_norms(tiny_model_factory("tiny-gemma3", TINY_GEMMA3))


@pytest.fixture(scope="module")
def tiny_mistral_windowed_dir(tiny_model_factory: Any) -> Path:
    return randomize_norms(tiny_model_factory("tiny-mistral-windowed", TINY_MISTRAL_WINDOWED))


FAMILIES = ["tiny_gemma2_dir", "tiny_gemma3_dir", "tiny_mistral_windowed_dir"]
ENGINE_PROMPTS = [1, 3, 8, 17, 47, 128, 200, 300]


def _load(model_dir: Path, **kwargs: Any) -> LoadedModel:
    config = ModelConfig(model=str(model_dir), **kwargs)
    return load_model(config, CPU, torch.float32, TorchAttentionBackend())


@pytest.mark.parametrize("fixture", FAMILIES)
def test_logits_match_transformers(fixture: str, request: pytest.FixtureRequest) -> None:
    """Every row of a paged schedule (whole ragged prompts, a two-chunk prefill whose second
    chunk starts past the window, decodes) within the Llama tests' fp32 tolerance."""
    loaded = _load(request.getfixturevalue(fixture))
    picks = check_against_transformers(
        loaded,
        prompts=random_prompts([1, 4, 7, 60, 250], loaded.model.vocab_size, seed=5),
        chunked_len=45,
        first_chunk=30,
        decode_steps=4,
        block_size=4,
        seed=11,
    )
    assert len(set(picks)) > len(picks) // 2, "tiny model logits collapse onto few tokens"


def test_families_build_their_own_layers(
    tiny_gemma2_dir: Path, tiny_gemma3_dir: Path, tiny_mistral_windowed_dir: Path
) -> None:
    gemma2 = _load(tiny_gemma2_dir).model
    assert isinstance(gemma2, Gemma2ForCausalLM)
    assert gemma2.lm_head.weight is gemma2.model.embed_tokens.weight
    attns = [layer.self_attn.attn for layer in gemma2.model.layers]
    assert [a.sliding_window for a in attns] == [WINDOW, None]
    assert [a.softcap for a in attns] == [2.0, 2.0]
    assert attns[0].scale == 24**-0.5
    assert isinstance(gemma2.model.layers[0].post_feedforward_layernorm, GemmaRMSNorm)

    gemma3 = _load(tiny_gemma3_dir).model
    assert isinstance(gemma3, Gemma3ForCausalLM)
    layers = gemma3.model.layers
    assert [layer.self_attn.attn.sliding_window for layer in layers] == [WINDOW, WINDOW, None]
    assert all(layer.self_attn.attn.softcap is None for layer in layers)
    local, global_ = layers[0].self_attn.rotary_emb, layers[2].self_attn.rotary_emb
    assert layers[1].self_attn.rotary_emb is local and global_ is not local
    assert not torch.equal(local.cos_sin_cache, global_.cos_sin_cache)

    mistral = _load(tiny_mistral_windowed_dir)
    assert type(mistral.model) is LlamaForCausalLM
    assert all(layer.self_attn.attn.sliding_window == WINDOW for layer in mistral.model.model.layers)
    # The window no longer bounds the sequence: the position table does.
    assert mistral.max_model_len == TINY_MISTRAL_WINDOWED["max_position_embeddings"]


def test_layer_sliding_window_follows_transformers_configs() -> None:
    from transformers import MistralConfig, Phi3Config, Qwen2Config

    assert layer_sliding_window(MistralConfig(sliding_window=None), 0) is None
    assert layer_sliding_window(MistralConfig(sliding_window=64), 3) == 64
    assert layer_sliding_window(Phi3Config(sliding_window=2047), 0) == 2047
    qwen2 = Qwen2Config(
        num_hidden_layers=4, use_sliding_window=True, sliding_window=32, max_window_layers=2
    )
    assert [layer_sliding_window(qwen2, i) for i in range(4)] == [None, None, 32, 32]
    assert layer_sliding_window(Qwen2Config(sliding_window=32), 3) is None


def test_dummy_gemma_norms_start_at_zero(tiny_gemma3_dir: Path) -> None:
    """Dummy weights start Gemma's (1 + w) norms where transformers' init does: w = 0."""
    model = _load(tiny_gemma3_dir, load_format="dummy").model
    norms = [m for m in model.modules() if isinstance(m, GemmaRMSNorm)]
    assert len(norms) == 3 * 6 + 1  # per layer: four around attention and MLP, q and k and all(bool((m.weight == 0).all()) for m in norms)


def test_unsupported_gemma_settings_are_refused(tiny_gemma2_dir: Path) -> None:
    def load(**overrides: Any) -> LoadedModel:
        return _load(tiny_gemma2_dir, load_format="dummy", hf_overrides=overrides)

    with pytest.raises(ModelLoadError, match="activation 'gelu'.*gelu_pytorch_tanh"):
        load(hidden_activation="gelu")
    with pytest.raises(ModelLoadError, match="bidirectional attention"):
        load(use_bidirectional_attention=True)


# The engine: 8 prompts of 1 to 300 tokens submitted together, a 64-token budget (chunked
# prefill) and a pool of 24 blocks (the longest request needs 20: preemption), greedy tokens
# equal transformers' generate (with its sliding-window cache) up to the near-tie rule. Every
# decode step of the prompts longer than the window slides it; 12 of them keep the test short.
# Mistral windows every layer, so its requests release the blocks behind the window: past its
# first chunk a request holds a constant number of blocks (a block dies for each one it fills),
# so with a 21-key window no pool that admits the longest request ever preempts. It runs as the
# Gemmas do without the preemption; a 100-key window (blocks released only for the prompts
# longer than it, 20 blocks) forces preemption with windows and released blocks.
ENGINE_RUNS = {
    "tiny_gemma2_dir": (24, True),
    "tiny_gemma3_dir": (24, True),
    "tiny_mistral_windowed_dir": (24, False),
    "tiny_mistral_wide_window_dir": (20, True),
}


@pytest.fixture(scope="module")
def tiny_mistral_wide_window_dir(tiny_model_factory: Any) -> Path:
    config = {**TINY_MISTRAL_WINDOWED, "sliding_window": 100}
    return randomize_norms(tiny_model_factory("tiny-mistral-wide-window", config))


@pytest.mark.parametrize("fixture", sorted(ENGINE_RUNS))
def test_engine_matches_transformers(fixture: str, request: pytest.FixtureRequest) -> None:
    num_blocks, preempts = ENGINE_RUNS[fixture]
    run_and_compare(
        request.getfixturevalue(fixture), 12, num_blocks=num_blocks, budget=64,
        prompt_lengths=ENGINE_PROMPTS, expect_preemption=preempts,
    )


def test_windowed_requests_hold_only_the_blocks_their_window_reads(
    tiny_mistral_windowed_dir: Path, tiny_gemma2_dir: Path
) -> None:
    """A 300-token prompt and 40 decode steps on Mistral (every layer windowed): after each
    step the request holds no more blocks than its window and its next chunk span, its
    tokens equal transformers' with no near-tie excused, and every block is free at the end.
    Gemma 2 has global layers: its requests release nothing."""
    from transformers import AutoModelForCausalLM

    budget, block_size = 64, 16
    llm = LLM(str(tiny_mistral_windowed_dir), dtype="float32", device="cpu",
              block_size=block_size, num_blocks=24, max_num_batched_tokens=budget)
    engine = llm.engine
    assert engine.block_manager.attention_window == WINDOW
    prompt = random_prompts([300], llm.tokenizer.vocab_size, seed=5)[0]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    req = engine.builder.build(prompt_token_ids=prompt, params=params)
    engine.add(req)
    # Keys from q - WINDOW + 1 for a chunk of up to ``budget`` tokens from q: their blocks.
    bound = -(-(WINDOW - 1 + budget) // block_size) + 1
    most_held = most_released = 0
    while engine.has_unfinished():
        engine.step()
        held = len(req.block_ids) - req.num_released_blocks
        assert held <= bound, (held, req.num_computed_tokens)
        most_held = max(most_held, held)
        most_released = max(most_released, req.num_released_blocks)
    assert most_released >= (300 + 40 - WINDOW) // block_size - 1
    assert engine.block_manager.num_free_blocks == 24
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_mistral_windowed_dir), dtype=torch.float32)
    want = hf_greedy(hf.eval(), prompt, 40, eos_token_id=[-1])
    assert compare_greedy([req.output_token_ids], [want]) == 0
    gemma = LLM(str(tiny_gemma2_dir), dtype="float32", device="cpu", block_size=16, num_blocks=24)
    assert gemma.engine.block_manager.attention_window is None


def test_long_prompt_decodes_like_transformers(tiny_gemma2_dir: Path) -> None:
    """One prompt four windows long, then 30 decode steps that each slide the window: the
    tokens equal transformers' with no near-tie excused."""
    from transformers import AutoModelForCausalLM

    llm = LLM(str(tiny_gemma2_dir), dtype="float32", device="cpu", block_size=16, num_blocks=12)
    prompt = random_prompts([4 * WINDOW], llm.tokenizer.vocab_size, seed=2)[0]
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    ours = llm.generate(prompt_token_ids=[prompt], sampling_params=params)[0].token_ids
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_gemma2_dir), dtype=torch.float32).eval()
    want = hf_greedy(hf, prompt, 30, eos_token_id=[-1])
    assert len(want.token_ids) == 30
    assert compare_greedy([ours], [want]) == 0
