"""Tiny model variants only the model tests need (the shared ones live in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


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
