"""Which of our model classes implements a Hugging Face config.

The config's ``architectures`` (written by transformers when a model is saved) names the
class; one family's file may serve several architectures. Configs that name none (a dummy
model described by ``hf_overrides`` alone, a hand-written config.json) fall back to the
architecture transformers gives their ``model_type``. The ``model_type`` is checked either way:
the families read it for their differences (Qwen2's biases), so an architecture name alone
must not admit a config of another type, nor a config of one family build another family's
class (Llama, Mistral and Qwen2 share one class, so their names may stand in for each other).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pagedserve.backend.errors import ModelLoadError
from pagedserve.backend.models.gemma2 import Gemma2ForCausalLM
from pagedserve.backend.models.gemma3 import Gemma3ForCausalLM
from pagedserve.backend.models.interface import CausalLM
from pagedserve.backend.models.llama import LlamaForCausalLM
from pagedserve.backend.models.mixtral import MixtralForCausalLM
from pagedserve.backend.models.phi3 import Phi3ForCausalLM
from pagedserve.backend.models.qwen3 import Qwen3ForCausalLM
from pagedserve.backend.models.qwen3_moe import Qwen3MoeForCausalLM


@dataclass(frozen=True)
class _Entry:
    architecture: str
    model_type: str  # the type transformers saves this architecture with
    model_class: type[CausalLM]


_ENTRIES = (
    _Entry("LlamaForCausalLM", "llama", LlamaForCausalLM),
    _Entry("MistralForCausalLM", "mistral", LlamaForCausalLM),
    _Entry("Qwen2ForCausalLM", "qwen2", LlamaForCausalLM),
    _Entry("Qwen3ForCausalLM", "qwen3", Qwen3ForCausalLM),
    _Entry("Phi3ForCausalLM", "phi3", Phi3ForCausalLM),
    _Entry("Gemma2ForCausalLM", "gemma2", Gemma2ForCausalLM),
    _Entry("Gemma3ForCausalLM", "gemma3_text", Gemma3ForCausalLM),
    _Entry("MixtralForCausalLM", "mixtral", MixtralForCausalLM),
    _Entry("Qwen3MoeForCausalLM", "qwen3_moe", Qwen3MoeForCausalLM),
)
_BY_ARCHITECTURE = {entry.architecture: entry for entry in _ENTRIES}
_BY_MODEL_TYPE = {entry.model_type: entry for entry in _ENTRIES}

SUPPORTED_ARCHITECTURES = tuple(_BY_ARCHITECTURE)
SUPPORTED_MODEL_TYPES = tuple(_BY_MODEL_TYPE)


def resolve_model_class(hf_config: Any) -> type[CausalLM]:
    """The class to build for ``hf_config``; ModelLoadError when no registered one fits."""
    model_type = hf_config.model_type
    if model_type not in _BY_MODEL_TYPE:
        raise ModelLoadError(
            f"model type {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    expected = _BY_MODEL_TYPE[model_type].model_class
    names = list(getattr(hf_config, "architectures", None) or [])
    if not names:
        return expected
    for name in names:
        if name in _BY_ARCHITECTURE:
            model_class = _BY_ARCHITECTURE[name].model_class
            if model_class is not expected:
                raise ModelLoadError(
                    f"architecture {name!r} does not fit model type {model_type!r} "
                    f"(that type is {_BY_MODEL_TYPE[model_type].architecture})"
                )
            return model_class
    raise ModelLoadError(
        f"architecture {', '.join(map(repr, names))} is not supported "
        f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
    )
