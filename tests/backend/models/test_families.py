"""Qwen3 and Phi-3 against transformers: logits over a paged schedule, then the engine's
greedy tokens.

Each family runs a tiny random-weight checkpoint written by transformers with the family's
quirks switched on (see conftest.py): Qwen3's per-head q/k norms and a head_dim that is not
hidden / heads; Phi-3's fused qkv and gate/up tensors, LongRoPE's factors and attention factor,
and partial rotary. Norm weights are random, not ones, so a misplaced norm shows.

LongRoPE: our model fixes its factors by max_model_len (see ``layers._rope_frequencies``);
transformers picks them per forward. The two agree on every sequence when max_model_len stays
within the pretraining length (short factors: ``tiny_phi3_dir``, run at max_model_len 512), and
on sequences longer than it from the prompt on when max_model_len exceeds it (long factors:
``tiny_phi3_long_dir``, every sequence longer than its 32-token pretraining length). Those are
the regimes tested here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pagedserve.backend.config import ModelConfig
from pagedserve.backend.errors import ModelLoadError
from pagedserve.backend.models.layer_context import LayerContext
from pagedserve.backend.models.layers import rope_parameters
from pagedserve.backend.models.loader import LoadedModel, load_model
from pagedserve.backend.models.phi3 import Phi3ForCausalLM, Phi3Model
from pagedserve.backend.models.qwen3 import Qwen3ForCausalLM
from pagedserve.backend.runner.attention import TorchAttentionBackend
from tests.backend.engine.test_engine_vs_transformers import run_and_compare
from tests.backend.models.conftest import TINY_PHI3_MAX_MODEL_LEN, longrope_factors
from tests.backend.models.paged_schedule import random_prompts, run_schedule
from tests.backend.models.test_llama_model import check_against_transformers

CPU = torch.device("cpu")
# Phi-3 at max_model_len 512, its pretraining length, keeps the short factors.
SHORT_ROPE_MAX_LEN = TINY_PHI3_MAX_MODEL_LEN
# (fixture, max_model_len, prompt lengths): the long-factor model sees only sequences longer
# than its 32-token pretraining length, where transformers runs the long factors too.
FAMILIES = {
    "qwen3": ("tiny_qwen3_dir", None, [1, 4, 7, 250]),
    "phi3-short-rope": ("tiny_phi3_dir", SHORT_ROPE_MAX_LEN, [1, 4, 7, 250]),
    "phi3-long-rope": ("tiny_phi3_long_dir", None, [33, 40, 250]),
}
ENGINE_PROMPTS = [1, 3, 8, 17, 47, 128, 200, 300]
LONG_ROPE_ENGINE_PROMPTS = [33, 40, 47, 64, 90, 160, 250, 300]


def _load(model_dir: Path, max_model_len: int | None = None) -> LoadedModel:
    config = ModelConfig(model=str(model_dir), max_model_len=max_model_len)
    return load_model(config, CPU, torch.float32, TorchAttentionBackend())


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family: str, request: pytest.FixtureRequest) -> None:
    """Every row of a paged schedule (whole ragged prompts, a two-chunk prefill, decodes)
    within the Llama tests' fp32 tolerance: 2e-5 of the row's max |logit|."""
    fixture, max_model_len, lengths = FAMILIES[family]
    loaded = _load(request.getfixturevalue(fixture), max_model_len)
    vocab = loaded.model.vocab_size
    picks = check_against_transformers(
        loaded,
        prompts=random_prompts(lengths, vocab, seed=5),
        chunked_len=45,
        first_chunk=18,
        decode_steps=4,
        block_size=4,
        seed=11,
    )
    assert len(set(picks)) > len(picks) // 2, "tiny model logits collapse onto few tokens"


def test_families_build_their_own_classes(
    tiny_qwen3_dir: Path, tiny_phi3_dir: Path, tiny_phi3_long_dir: Path
) -> None:
    qwen3 = _load(tiny_qwen3_dir).model
    assert isinstance(qwen3, Qwen3ForCausalLM)
    assert qwen3.head_dim == 32 and qwen3.lm_head.weight is qwen3.model.embed_tokens.weight
    attn = qwen3.model.layers[0].self_attn
    assert attn.qkv_proj.bias is None and attn.q_norm.weight.shape == (32,)

    short = _load(tiny_phi3_dir, SHORT_ROPE_MAX_LEN).model
    assert isinstance(short, Phi3ForCausalLM)
    rotary = short.model.layers[0].self_attn.rotary_emb
    assert (rotary.rotary_dim, rotary.head_dim) == (12, 16)
    # The long-factor model with the same pretraining length as the short one: only the
    # engine's max_model_len decides, and it changes the table.
    long = _load(tiny_phi3_dir).model
    assert not torch.equal(
        long.model.layers[0].self_attn.rotary_emb.cos_sin_cache, rotary.cos_sin_cache
    )
    assert long.lm_head.weight is not long.model.embed_tokens.weight


@pytest.mark.parametrize("partial", [1.0, 0.75])
@pytest.mark.parametrize("max_model_len", [64, 65, 1024])
def test_longrope_rotary_equals_transformers(partial: float, max_model_len: int) -> None:
    """Bit for bit: transformers' Phi-3 rotary for a forward whose longest sequence is
    ``max_model_len`` against ours built for that max_model_len (64: short factors, 65 and
    1024: long ones), with the attention factor of a 16x stretch."""
    from transformers import Phi3Config
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding, apply_rotary_pos_emb

    head_dim = 32
    half = int(head_dim * partial) // 2
    config = Phi3Config(
        hidden_size=128,
        num_attention_heads=4,
        max_position_embeddings=1024,
        original_max_position_embeddings=64,
        partial_rotary_factor=partial,
        rope_scaling={
            "type": "longrope",
            "short_factor": longrope_factors(half, 1.5),
            "long_factor": longrope_factors(half, 12.0),
        },
    )
    params = rope_parameters(config)
    ctx = LayerContext(torch.float32, CPU, max_model_len=max_model_len)
    ours = Phi3Model.rotary_embedding(config, ctx)
    assert ours.rotary_dim == 2 * half

    gen = torch.Generator().manual_seed(0)
    positions = torch.randint(0, max_model_len, (48,), generator=gen)
    positions[0] = max_model_len - 1  # transformers picks the factors by the longest position
    q = torch.randn(48, 4, head_dim, generator=gen)
    k = torch.randn(48, 2, head_dim, generator=gen)
    q_rot, k_rot = ours(positions, q, k)

    hf = Phi3RotaryEmbedding(config)
    cos, sin = hf(q, positions[None])
    want_q, want_k = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin
    )
    assert torch.equal(q_rot, want_q[0].transpose(0, 1))
    assert torch.equal(k_rot, want_k[0].transpose(0, 1))
    assert params["factor"] == 16.0


def _prompt_logits(loaded: LoadedModel, prompts: list[list[int]]) -> list[torch.Tensor]:
    sequences = dict(enumerate(prompts))
    rows = run_schedule(
        loaded.model, sequences, [{s: (0, len(p)) for s, p in sequences.items()}], 16,
        torch.float32, CPU,
    )
    return [row for _, _, row in rows]


def test_su_rope_name_loads_as_longrope(tiny_phi3_long_dir: Path, tmp_path: Path) -> None:
    """Early Phi-3 configs call LongRoPE ``su`` and spell it as transformers 4 did; the same
    weights then give the same logits. (transformers 5 reads an ``su`` config only with the
    pretraining length inside ``rope_scaling``: it checks the keys before renaming the type.)"""
    legacy = tmp_path / "su"
    shutil.copytree(tiny_phi3_long_dir, legacy)
    config = json.loads((legacy / "config.json").read_text())
    params = config.pop("rope_parameters")
    config["rope_theta"] = params["rope_theta"]
    config["rope_scaling"] = {
        "type": "su",
        "original_max_position_embeddings": config["original_max_position_embeddings"],
        "short_factor": params["short_factor"],
        "long_factor": params["long_factor"],
    }
    (legacy / "config.json").write_text(json.dumps(config))
    prompts = random_prompts([40, 100], 49152, seed=3)
    want = _prompt_logits(_load(tiny_phi3_long_dir), prompts)
    got = _prompt_logits(_load(legacy), prompts)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_phi3_fused_tensors_are_checked(tiny_phi3_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_phi3_dir, bad)
    state = load_file(str(bad / "model.safetensors"))
    name = "model.layers.1.self_attn.qkv_proj.weight"
    state[name] = state[name][:-16]  # one KV head's v rows short
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"qkv_proj.weight.*expected 128 rows \(64 \+ 32 \+ 32\)"):
        _load(bad)


def _dummy_phi3(model_dir: Path, rope: dict[str, object]) -> LoadedModel:
    config = ModelConfig(
        model=str(model_dir),
        load_format="dummy",
        max_model_len=SHORT_ROPE_MAX_LEN,
        hf_overrides={"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, **rope}},
    )
    return load_model(config, CPU, torch.float32, TorchAttentionBackend())


def test_bad_longrope_settings_are_refused(tiny_phi3_dir: Path) -> None:
    three = [1.0, 1.0, 1.0]
    with pytest.raises(ModelLoadError, match="LongRoPE short_factor has 3 entries"):
        _dummy_phi3(
            tiny_phi3_dir,
            {"partial_rotary_factor": 0.75, "short_factor": three, "long_factor": three},
        )
    # 0.7 of a 16-dim head: 11 dims, which the rotate-half layout cannot pair.
    with pytest.raises(ModelLoadError, match="rotary dim of 11 is not supported"):
        _dummy_phi3(
            tiny_phi3_dir,
            {"partial_rotary_factor": 0.7, "short_factor": three, "long_factor": three},
        )


# The engine: 8 prompts of 1 to 300 tokens submitted together, a 64-token budget (chunked
# prefill) and a pool of 24 blocks (the longest request needs 20: preemption), greedy tokens
# equal transformers' generate up to the engine tests' near-tie rule.
def test_qwen3_engine_matches_transformers(tiny_qwen3_dir: Path) -> None:
    run_and_compare(tiny_qwen3_dir, 20, num_blocks=24, budget=64, prompt_lengths=ENGINE_PROMPTS)


def test_phi3_short_rope_engine_matches_transformers(tiny_phi3_dir: Path) -> None:
    run_and_compare(
        tiny_phi3_dir, 20, num_blocks=24, budget=64, prompt_lengths=ENGINE_PROMPTS,
        max_model_len=SHORT_ROPE_MAX_LEN,
    )


def test_phi3_long_rope_engine_matches_transformers(tiny_phi3_long_dir: Path) -> None:
    run_and_compare(
        tiny_phi3_long_dir, 20, num_blocks=24, budget=64, prompt_lengths=LONG_ROPE_ENGINE_PROMPTS
    )
