"""Tiny model variants only the model tests need (the shared ones live in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import TINY_LLAMA


@pytest.fixture(scope="session")
def tiny_llama3_dir(tiny_model_factory: Any, tiny_llama_settings: dict[str, Any]) -> Path:
    """Llama-3.1-style RoPE scaling, untied head, and a head_dim (32) that is not
    hidden_size / heads (16), so q/o projections are wider than the hidden state."""
    settings = {
        **tiny_llama_settings,
        "tie_word_embeddings": False,
        "head_dim": 32,
        "num_hidden_layers": 3,
        "rope_theta": 500000.0,
        # Small original context so every frequency band (kept, smoothed, scaled) is present.
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    }
    return tiny_model_factory("tiny-llama3", settings)


@pytest.fixture(scope="session")
def tiny_mistral_dir(tiny_model_factory: Any, tiny_llama_settings: dict[str, Any]) -> Path:
    """Mistral with 4 query heads per KV head and a sliding window wider than any test prompt."""
    settings = {
        **tiny_llama_settings,
        "model_type": "mistral",
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "hidden_size": 128,
        "sliding_window": 512,
        "tie_word_embeddings": False,
    }
    return tiny_model_factory("tiny-mistral", settings)


def randomize_norms(model_dir: Path, seed: int = 0) -> Path:
    """Norm weights of 1 + N(0, 0.3) in place of transformers' ones, so a norm applied to the
    wrong tensor, at the wrong point or not at all changes the logits."""
    path = model_dir / "model.safetensors"
    state = load_file(str(path))
    generator = torch.Generator().manual_seed(seed)
    for name in sorted(state):
        if name.endswith("norm.weight"):
            shape = state[name].shape
            state[name] = 1 + 0.3 * torch.randn(shape, generator=generator)
    save_file(state, str(path), metadata={"format": "pt"})
    return model_dir


def longrope_factors(n: int, top: float) -> list[float]:
    """``n`` rescale factors rising from 1 to ``top``, like a checkpoint's."""
    return [1.0 + (top - 1.0) * i / max(1, n - 1) for i in range(n)]


# Qwen3: q/k RMSNorm per head, a head_dim (32) that is not hidden_size / heads (16), GQA 4 over
# 2, tied embeddings, no q/k/v bias.
TINY_QWEN3: dict[str, Any] = {
    **TINY_LLAMA,
    "model_type": "qwen3",
    "head_dim": 32,
    "rope_theta": 1000000.0,
    "attention_bias": False,
    "use_sliding_window": False,
    "tie_word_embeddings": True,
}


# Mixture of experts: 8 experts, top-2. Mixtral: Mistral's attention, every layer sparse.
# Qwen3-MoE: Qwen3's attention, a dense layer (mlp_only_layers) between two sparse ones; the
# unnormalised variant keeps the raw top-k softmax weights, every other layer sparse.
TINY_MIXTRAL: dict[str, Any] = {
    **TINY_LLAMA,
    "model_type": "mixtral",
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "intermediate_size": 64,
    "tie_word_embeddings": False,
    "sliding_window": None,
}
TINY_QWEN3_MOE: dict[str, Any] = {
    **TINY_QWEN3,
    "model_type": "qwen3_moe",
    "num_hidden_layers": 3,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 48,
    "intermediate_size": 96,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [1],
}
TINY_QWEN3_MOE_UNNORMALISED: dict[str, Any] = {
    **TINY_QWEN3_MOE,
    "norm_topk_prob": False,
    "decoder_sparse_step": 2,
    "mlp_only_layers": [],
}


def _phi3_settings(original: int, partial: float) -> dict[str, Any]:
    rotary_half = int(16 * partial) // 2  # head_dim 16
    return {
        **TINY_LLAMA,
        "model_type": "phi3",
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 1024,
        "original_max_position_embeddings": original,
        "partial_rotary_factor": partial,
        "rope_scaling": {
            "type": "longrope",
            "short_factor": longrope_factors(rotary_half, 1.8),
            "long_factor": longrope_factors(rotary_half, 24.0),
        },
        "sliding_window": None,
    }


# Phi-4-mini-shaped: fused qkv and gate/up tensors, LongRoPE with a pretraining length (512)
# beyond every test sequence, so a max_model_len within it keeps the short factors (run it at
# TINY_PHI3_MAX_MODEL_LEN); 3/4 of each head rotates; untied head.
TINY_PHI3 = _phi3_settings(original=512, partial=0.75)
TINY_PHI3_MAX_MODEL_LEN = 512
# Phi-3.5-mini-shaped: LongRoPE with a 32-token pretraining length, so at its default
# max_model_len (1024) it runs the long factors and a stretch factor of 32; whole heads rotate.
TINY_PHI3_LONG = _phi3_settings(original=32, partial=1.0)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tiny_model_factory: Any) -> Path:
    """TINY_QWEN3 with random norm weights."""
    return randomize_norms(tiny_model_factory("tiny-qwen3", TINY_QWEN3))


@pytest.fixture(scope="session")
def tiny_phi3_dir(tiny_model_factory: Any) -> Path:
    """TINY_PHI3 (short LongRoPE factors at max_model_len 512) with random norm weights."""
    return randomize_norms(tiny_model_factory("tiny-phi3", TINY_PHI3))


@pytest.fixture(scope="session")
def tiny_phi3_long_dir(tiny_model_factory: Any) -> Path:
    """TINY_PHI3_LONG (long LongRoPE factors) with random norm weights."""
    return randomize_norms(tiny_model_factory("tiny-phi3-long", TINY_PHI3_LONG))


# Gemma 2 / 3 and a windowed Mistral, their quirks on (the Gemma tests, the CUDA model tests).
WINDOW = 21  # shorter than most prompts; ends inside a 16-token block

_GEMMA_COMMON: dict[str, Any] = {
    "vocab_size": TINY_LLAMA["vocab_size"],
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "query_pre_attn_scalar": 24,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "initializer_range": TINY_LLAMA["initializer_range"],
    "sliding_window": WINDOW,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}
TINY_GEMMA2: dict[str, Any] = {
    **_GEMMA_COMMON,
    "model_type": "gemma2",
    "num_hidden_layers": 2,
    "layer_types": ["sliding_attention", "full_attention"],
    "attn_logit_softcapping": 2.0,
    "final_logit_softcapping": 1.5,
}
TINY_GEMMA3: dict[str, Any] = {
    **_GEMMA_COMMON,
    "model_type": "gemma3_text",
    "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
    },
    "attn_logit_softcapping": 2.0,  # transformers' Gemma 3 does not apply it
    "final_logit_softcapping": None,
}
TINY_MISTRAL_WINDOWED: dict[str, Any] = {
    **TINY_LLAMA,
    "model_type": "mistral",
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "hidden_size": 128,
    "sliding_window": WINDOW,
    "tie_word_embeddings": False,
}
