"""Gemma 2 decoder: Llama's parts rearranged, with Gemma's numerical quirks.

What differs from Llama, each as transformers' Gemma 2 does it:

- the token embedding is multiplied by sqrt(hidden_size), rounded to the model dtype first;
- RMSNorm scales by ``1 + weight`` (checkpoints store the offset from one), normalising and
  scaling in fp32 and rounding once at the end;
- four norms per layer: before and after attention, before and after the MLP; the residual is
  added after each post-norm;
- the MLP is GeGLU with the tanh approximation of GELU (``gelu_pytorch_tanh``);
- attention scores are scaled by ``query_pre_attn_scalar ** -0.5`` (not head_dim's) and
  soft-capped, ``c * tanh(s / c)`` with ``attn_logit_softcapping``; the final logits likewise
  with ``final_logit_softcapping``;
- ``layer_types`` alternates local layers (a sliding window of ``sliding_window`` keys) with
  global ones; the attention backend runs each layer's window.

Checkpoint names are Llama's plus ``pre_feedforward_layernorm`` and
``post_feedforward_layernorm``; the embeddings are tied.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from pagedserve.backend.models.layer_context import LayerContext
from pagedserve.backend.models.layers import RMSNorm, RotaryEmbedding
from pagedserve.backend.models.llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
)
from pagedserve.backend.runner.attention import AttentionBackend


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(x / cap)``, in x's dtype; x itself without a cap."""
    return x if cap is None else torch.tanh(x / cap) * cap


class GemmaRMSNorm(RMSNorm):
    """x / rms(x) * (1 + weight), in fp32, rounded once to x's dtype (Llama rounds before its
    weight). Plain torch on every device: the shared norm kernels compute Llama's order."""

    initial_value = 0.0

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (norm(x + residual), x + residual); without a residual, (norm(x), x)."""
        if residual is not None:
            x = x + residual
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.float())).to(x.dtype), x


class Gemma2MLP(LlamaMLP):
    activation = "gelu_pytorch_tanh"

    @staticmethod
    def activation_name(hf_config: Any) -> str:
        return str(hf_config.hidden_activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Gemma2Attention(LlamaAttention):
    @staticmethod
    def attention_scale(hf_config: Any) -> float:
        return float(hf_config.query_pre_attn_scalar) ** -0.5

    @staticmethod
    def logit_softcap(hf_config: Any) -> float | None:
        cap = getattr(hf_config, "attn_logit_softcapping", None)
        return None if cap is None else float(cap)


class Gemma2DecoderLayer(LlamaDecoderLayer):
    attention_class = Gemma2Attention
    mlp_class = Gemma2MLP
    norm_class = GemmaRMSNorm

    def __init__(
        self,
        hf_config: Any,
        layer_index: int,
        rotary_emb: RotaryEmbedding,
        attn_backend: AttentionBackend,
        ctx: LayerContext,
    ) -> None:
        super().__init__(hf_config, layer_index, rotary_emb, attn_backend, ctx)
        eps = hf_config.rms_norm_eps
        self.pre_feedforward_layernorm = GemmaRMSNorm(hf_config.hidden_size, eps, ctx)
        self.post_feedforward_layernorm = GemmaRMSNorm(hf_config.hidden_size, eps, ctx)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As Llama's layer: (output, residual before it), the add left to the next norm."""
        hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, _ = self.post_attention_layernorm(hidden)
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        hidden = self.mlp(hidden)
        hidden, _ = self.post_feedforward_layernorm(hidden)
        return hidden, residual


class Gemma2Model(LlamaModel):
    layer_class = Gemma2DecoderLayer

    def __init__(self, hf_config: Any, attn_backend: AttentionBackend, ctx: LayerContext) -> None:
        if getattr(hf_config, "use_bidirectional_attention", False):
            raise NotImplementedError("bidirectional attention (embedding models) is not supported")
        super().__init__(hf_config, attn_backend, ctx)
        # transformers keeps sqrt(hidden) as an fp32 scalar and rounds it to the weight dtype.
        normalizer = torch.tensor(hf_config.hidden_size**0.5).to(ctx.dtype)
        self.register_buffer("normalizer", normalizer.to(ctx.device), persistent=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids) * self.normalizer


class Gemma2ForCausalLM(LlamaForCausalLM):
    model_class = Gemma2Model

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        cap = getattr(self.config, "final_logit_softcapping", None)
        return softcap(super().compute_logits(hidden), cap)
