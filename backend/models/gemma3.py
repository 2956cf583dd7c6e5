"""Gemma 3 text decoder (``Gemma3ForCausalLM``, model type ``gemma3_text``): Gemma 2's layers
with a (1 + w) RMSNorm of every query and key head, and two rotary embeddings.

Local (sliding-window) layers rotate with their own base (``rope_parameters
["sliding_attention"]``, ``rope_local_base_freq`` in older configs), global layers with the
global base and its scaling (``rope_parameters["full_attention"]``, linear in the larger
checkpoints). The local/global pattern is ``layer_types`` (transformers derives it from
``sliding_window_pattern`` when a config has only that). As in transformers, attention scores
are not soft-capped (``attn_logit_softcapping`` is read by Gemma 2 only); final logits are
when ``final_logit_softcapping`` is set.
"""

from __future__ import annotations

from typing import Any

from pagedserve.backend.models.gemma2 import (
    Gemma2Attention,
    Gemma2DecoderLayer,
    Gemma2ForCausalLM,
    Gemma2Model,
    GemmaRMSNorm,
)
from pagedserve.backend.models.layer_context import LayerContext
from pagedserve.backend.models.layers import RotaryEmbedding, rope_parameters
from pagedserve.backend.models.llama import head_dim_of

_LOCAL, _GLOBAL = "sliding_attention", "full_attention"


class Gemma3Attention(Gemma2Attention):
    head_norm_class = GemmaRMSNorm

    @staticmethod
    def logit_softcap(hf_config: Any) -> float | None:
        return None


class Gemma3DecoderLayer(Gemma2DecoderLayer):
    attention_class = Gemma3Attention


class Gemma3Model(Gemma2Model):
    layer_class = Gemma3DecoderLayer

    def layer_rotary_embeddings(self, hf_config: Any, ctx: LayerContext) -> list[RotaryEmbedding]:
        """One table per layer type, shared by the layers of that type."""
        head_dim = head_dim_of(hf_config)
        tables = {
            layer_type: RotaryEmbedding(
                head_dim,
                hf_config.max_position_embeddings,
                rope_parameters(hf_config, layer_type),
                ctx,
            )
            for layer_type in sorted(set(hf_config.layer_types))
        }
        unknown = set(tables) - {_LOCAL, _GLOBAL}
        if unknown:
            raise NotImplementedError(f"layer types {sorted(unknown)} are not supported")
        return [tables[layer_type] for layer_type in hf_config.layer_types]


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Checkpoint names are Gemma 2's plus ``self_attn.q_norm`` and ``self_attn.k_norm``."""

    model_class = Gemma3Model
