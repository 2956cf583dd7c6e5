"""Qwen3 decoder: Llama's layers plus an RMSNorm of every query and key head.

Each head of q and k is normalised over ``head_dim`` (one weight of ``head_dim``, shared by the
heads) after the projection and before the rotary embedding, as transformers' Qwen3 does. The
rest is Llama's: no q/k/v bias unless ``attention_bias``, a ``head_dim`` that may differ from
``hidden_size / num_attention_heads``, tied embeddings in the small models. The norm weights
are whole on every tensor-parallel rank, since every rank holds whole heads.
"""

from __future__ import annotations

from pagedserve.backend.models.layers import RMSNorm
from pagedserve.backend.models.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
)


class Qwen3Attention(LlamaAttention):
    head_norm_class = RMSNorm


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_class = Qwen3Attention


class Qwen3Model(LlamaModel):
    layer_class = Qwen3DecoderLayer


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3 dense models; checkpoint names are Llama's plus ``self_attn.q_norm`` and
    ``self_attn.k_norm``, which load as they are."""

    model_class = Qwen3Model
