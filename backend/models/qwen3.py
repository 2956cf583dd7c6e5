"""Qwen3 decoder: Llama's layers plus an RMSNorm of every query and key head.

Each head of q and k is normalised over ``head_dim`` (one weight of ``head_dim``, shared by the
heads) after the projection and before the rotary embedding, as transformers' Qwen3 does. The
rest is Llama's: no q/k/v bias unless ``attention_bias``, a ``head_dim`` that may differ from
``hidden_size / num_attention_heads``, tied embeddings in the small models. The norm weights
are whole on every tensor-parallel rank, since every rank holds whole heads.
"""

from __future__ import annotations

from typing import Any

import torch

from pagedserve.backend.models.layer_context import LayerContext
from pagedserve.backend.models.layers import RMSNorm, RotaryEmbedding
from pagedserve.backend.models.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    head_dim_of,
)
from pagedserve.backend.runner.attention import AttentionBackend


class Qwen3Attention(LlamaAttention):
    def __init__(
        self,
        hf_config: Any,
        layer_index: int,
        rotary_emb: RotaryEmbedding,
        attn_backend: AttentionBackend,
        ctx: LayerContext,
    ) -> None:
        super().__init__(hf_config, layer_index, rotary_emb, attn_backend, ctx)
        head_dim = head_dim_of(hf_config)
        self.q_norm = RMSNorm(head_dim, hf_config.rms_norm_eps, ctx)
        self.k_norm = RMSNorm(head_dim, hf_config.rms_norm_eps, ctx)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        q, _ = self.q_norm(q)  # [T, heads, head_dim]: each head normalised on its own
        k, _ = self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v))


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_class = Qwen3Attention


class Qwen3Model(LlamaModel):
    layer_class = Qwen3DecoderLayer


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3 dense models; checkpoint names are Llama's plus ``self_attn.q_norm`` and
    ``self_attn.k_norm``, which load as they are."""

    model_class = Qwen3Model
