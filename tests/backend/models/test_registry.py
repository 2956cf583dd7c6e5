"""The registry picks our class from a config's architectures (or, lacking them, its model
type) and refuses, with a ModelLoadError naming what is supported, anything else."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from pagedserve.backend.config import ModelConfig
from pagedserve.backend.errors import ModelLoadError
from pagedserve.backend.models.gemma2 import Gemma2ForCausalLM
from pagedserve.backend.models.gemma3 import Gemma3ForCausalLM
from pagedserve.backend.models.interface import CausalLM
from pagedserve.backend.models.llama import LlamaForCausalLM
from pagedserve.backend.models.loader import load_model
from pagedserve.backend.models.mixtral import MixtralForCausalLM
from pagedserve.backend.models.phi3 import Phi3ForCausalLM
from pagedserve.backend.models.qwen3 import Qwen3ForCausalLM
from pagedserve.backend.models.qwen3_moe import Qwen3MoeForCausalLM
from pagedserve.backend.models.registry import resolve_model_class
from pagedserve.backend.runner.attention import TorchAttentionBackend

ARCHITECTURES: dict[str, tuple[str, type[CausalLM]]] = {
    "LlamaForCausalLM": ("llama", LlamaForCausalLM),
    "MistralForCausalLM": ("mistral", LlamaForCausalLM),
    "Qwen2ForCausalLM": ("qwen2", LlamaForCausalLM),
    "Qwen3ForCausalLM": ("qwen3", Qwen3ForCausalLM),
    "Phi3ForCausalLM": ("phi3", Phi3ForCausalLM),
    "Gemma2ForCausalLM": ("gemma2", Gemma2ForCausalLM),
    "Gemma3ForCausalLM": ("gemma3_text", Gemma3ForCausalLM),
    "MixtralForCausalLM": ("mixtral", MixtralForCausalLM),
    "Qwen3MoeForCausalLM": ("qwen3_moe", Qwen3MoeForCausalLM),
}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_each_architecture_resolves_with_or_without_its_name(architecture: str) -> None:
    model_type, model_class = ARCHITECTURES[architecture]
    named = AutoConfig.for_model(model_type, architectures=[architecture])
    assert resolve_model_class(named) is model_class
    # Configs built from hf_overrides name no architecture: the model type stands in for it.
    unnamed = AutoConfig.for_model(model_type)
    assert not unnamed.architectures
    assert resolve_model_class(unnamed) is model_class


def test_the_first_registered_architecture_of_several_wins() -> None:
    config = AutoConfig.for_model("llama", architectures=["LlamaModel", "LlamaForCausalLM"])
    assert resolve_model_class(config) is LlamaForCausalLM


def test_unknown_architectures_and_model_types_are_refused() -> None:
    head = AutoConfig.for_model("llama", architectures=["LlamaForSequenceClassification"])
    with pytest.raises(
        ModelLoadError,
        match=r"architecture 'LlamaForSequenceClassification' is not supported "
        r"\(supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, "
        r"Qwen3ForCausalLM, Phi3ForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM, "
        r"MixtralForCausalLM, Qwen3MoeForCausalLM\)",
    ):
        resolve_model_class(head)
    # A registered architecture name does not admit a config of another type.
    gpt2 = AutoConfig.for_model("gpt2", architectures=["LlamaForCausalLM"])
    with pytest.raises(
        ModelLoadError,
        match=r"'gpt2' is not supported \(supported: llama, mistral, qwen2, qwen3, phi3, "
        r"gemma2, gemma3_text, mixtral, qwen3_moe\)",
    ):
        resolve_model_class(gpt2)


def test_an_architecture_of_another_family_is_refused() -> None:
    """Llama, Mistral and Qwen2 share one class, so their names may stand in for each other;
    a name whose class differs from the model type's would build the wrong layers."""
    cross = AutoConfig.for_model("mistral", architectures=["LlamaForCausalLM"])
    assert resolve_model_class(cross) is LlamaForCausalLM
    # Gemma 3's class extends Gemma 2's, but it builds q/k norms a Gemma 2 checkpoint lacks.
    crossed = [
        ("llama", "Qwen3ForCausalLM"),
        ("qwen3", "Phi3ForCausalLM"),
        ("gemma2", "Gemma3ForCausalLM"),
        ("gemma3_text", "Gemma2ForCausalLM"),
    ]
    for model_type, architecture in crossed:
        config = AutoConfig.for_model(model_type, architectures=[architecture])
        with pytest.raises(
            ModelLoadError, match=f"architecture '{architecture}' does not fit model type"
        ):
            resolve_model_class(config)


def test_loader_builds_through_the_registry(tiny_llama_dir: Path) -> None:
    config = ModelConfig(
        model=str(tiny_llama_dir), hf_overrides={"architectures": ["GPT2LMHeadModel"]}
    )
    with pytest.raises(ModelLoadError, match="architecture 'GPT2LMHeadModel' is not supported"):
        load_model(config, torch.device("cpu"), torch.float32, TorchAttentionBackend())
