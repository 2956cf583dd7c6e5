"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, SmolLM) over the paged KV cache.

The forward takes one flat step batch (prefill chunks and decode tokens mixed) as token ids
and positions; each layer's ``Attention`` finds its cache and the batch layout in the forward
context and hands them to an ``AttentionBackend``. transformers supplies the config only.
Parameter names follow the Hugging Face checkpoints except where projections are fused
(``qkv_proj``, ``gate_up_proj``); ``load_weights`` maps the checkpoint names onto them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import nn

from pagedserve.backend.errors import ModelLoadError
from pagedserve.backend.models.interface import CausalLM
from pagedserve.backend.models.layer_context import LayerContext
from pagedserve.backend.models.layers import (
    Attention,
    LMHead,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabEmbedding,
    layer_sliding_window,
    rope_parameters,
)
from pagedserve.backend.runner.attention import AttentionBackend, get_forward_context
from pagedserve.kernels import activation as activation_ops

# Checkpoint projection name -> (fused parameter name, shard id).
_STACKED_PARAMS: dict[str, tuple[str, str | int]] = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}

# Buffers some older checkpoints carry; recomputed here, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _attention_biases(hf_config: Any) -> tuple[bool, bool]:
    """(bias on q/k/v, bias on o_proj): Qwen2 always has the first and never the second;
    Llama and Mistral follow ``attention_bias`` for both."""
    if hf_config.model_type == "qwen2":
        return True, False
    bias = bool(getattr(hf_config, "attention_bias", False))
    return bias, bias


def head_dim_of(hf_config: Any) -> int:
    head_dim = getattr(hf_config, "head_dim", None)
    return int(head_dim) if head_dim else hf_config.hidden_size // hf_config.num_attention_heads


class LlamaAttention(nn.Module):
    # A norm of every query and key head over head_dim after the projection, before the rotary
    # embedding (Qwen3, Gemma 3); one weight per norm, whole on every rank. None: Llama's.
    head_norm_class: type[RMSNorm] | None = None

    def __init__(
        self,
        hf_config: Any,
        layer_index: int,
        rotary_emb: RotaryEmbedding,
        attn_backend: AttentionBackend,
        ctx: LayerContext,
    ) -> None:
        super().__init__()
        head_dim = head_dim_of(hf_config)
        num_heads = hf_config.num_attention_heads
        num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
        qkv_bias, o_bias = _attention_biases(hf_config)
        self.qkv_proj = QKVParallelLinear(
            hf_config.hidden_size, head_dim, num_heads, num_kv_heads, qkv_bias, ctx
        )
        self.o_proj = RowParallelLinear(num_heads * head_dim, hf_config.hidden_size, o_bias, ctx)
        self.rotary_emb = rotary_emb
        self.attn = Attention(
            layer_index,
            self.qkv_proj.num_heads,
            self.qkv_proj.num_kv_heads,
            head_dim,
            self.attention_scale(hf_config),
            attn_backend,
            sliding_window=layer_sliding_window(hf_config, layer_index),
            softcap=self.logit_softcap(hf_config),
        )
        if self.head_norm_class is not None:
            self.q_norm = self.head_norm_class(head_dim, hf_config.rms_norm_eps, ctx)
            self.k_norm = self.head_norm_class(head_dim, hf_config.rms_norm_eps, ctx)

    @staticmethod
    def attention_scale(hf_config: Any) -> float:
        """What q.k is multiplied by before the softmax."""
        return float(head_dim_of(hf_config) ** -0.5)

    @staticmethod
    def logit_softcap(hf_config: Any) -> float | None:
        """The cap c of c * tanh(score / c) on the attention scores; None: uncapped."""
        return None

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        if self.head_norm_class is not None:
            q, _ = self.q_norm(q)  # [T, heads, head_dim]: each head normalised on its own
            k, _ = self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v))


class LlamaMLP(nn.Module):
    # The one activation this MLP computes, as the config names it.
    activation = "silu"

    def __init__(self, hf_config: Any, ctx: LayerContext) -> None:
        super().__init__()
        name = self.activation_name(hf_config)
        if name != self.activation:
            raise ModelLoadError(f"activation {name!r} is not supported ({self.activation})")
        bias = bool(getattr(hf_config, "mlp_bias", False))
        inter = hf_config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            hf_config.hidden_size, [inter, inter], bias, ctx
        )
        self.down_proj = RowParallelLinear(inter, hf_config.hidden_size, bias, ctx)

    @staticmethod
    def activation_name(hf_config: Any) -> str:
        return str(hf_config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(activation_ops.silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    # A family whose layers differ from Llama's in attention alone (Qwen3) overrides this;
    # Gemma swaps all three parts.
    attention_class: type[LlamaAttention] = LlamaAttention
    mlp_class: type[LlamaMLP] = LlamaMLP
    norm_class: type[RMSNorm] = RMSNorm

    def __init__(
        self,
        hf_config: Any,
        layer_index: int,
        rotary_emb: RotaryEmbedding,
        attn_backend: AttentionBackend,
        ctx: LayerContext,
    ) -> None:
        super().__init__()
        eps = hf_config.rms_norm_eps
        self.self_attn = self.attention_class(
            hf_config, layer_index, rotary_emb, attn_backend, ctx
        )
        self.mlp = self.build_mlp(hf_config, layer_index, ctx)
        self.input_layernorm = self.norm_class(hf_config.hidden_size, eps, ctx)
        self.post_attention_layernorm = self.norm_class(hf_config.hidden_size, eps, ctx)

    @classmethod
    def build_mlp(cls, hf_config: Any, layer_index: int, ctx: LayerContext) -> nn.Module:
        """The layer's MLP (``mlp_class``); mixture-of-experts families put a sparse block in
        some layers."""
        return cls.mlp_class(hf_config, ctx)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's output, residual stream before it); the caller adds them
        inside the next norm, so every residual add fuses with a norm."""
        hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    layer_class: type[LlamaDecoderLayer] = LlamaDecoderLayer

    def __init__(self, hf_config: Any, attn_backend: AttentionBackend, ctx: LayerContext) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(hf_config.vocab_size, hf_config.hidden_size, ctx)
        rotary_embs = self.layer_rotary_embeddings(hf_config, ctx)
        self.layers = nn.ModuleList(
            self.layer_class(hf_config, i, rotary_embs[i], attn_backend, ctx)
            for i in range(hf_config.num_hidden_layers)
        )
        self.norm = self.layer_class.norm_class(hf_config.hidden_size, hf_config.rms_norm_eps, ctx)

    def layer_rotary_embeddings(self, hf_config: Any, ctx: LayerContext) -> list[RotaryEmbedding]:
        """Each layer's rotary embedding: here one, shared by all (Gemma 3 has two)."""
        return [self.rotary_embedding(hf_config, ctx)] * hf_config.num_hidden_layers

    @staticmethod
    def rotary_embedding(hf_config: Any, ctx: LayerContext) -> RotaryEmbedding:
        """The one rotary embedding all layers share; whole heads rotate in this family."""
        return RotaryEmbedding(
            head_dim_of(hf_config),
            hf_config.max_position_embeddings,
            rope_parameters(hf_config),
            ctx,
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        num_caches = len(get_forward_context().kv_caches)
        if num_caches != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} KV caches, got {num_caches}")
        hidden = self.embed(input_ids)
        residual: torch.Tensor | None = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class LlamaForCausalLM(CausalLM):
    """The runner's model: ``forward`` gives final hidden states, ``compute_logits`` fp32
    logits for the rows the sampler needs (so the vocab projection skips prompt tokens).

    One class serves every registered Llama-shaped architecture (Llama, Mistral, Qwen2); the
    few differences (Qwen2's biases) are read from the config's ``model_type``. Families built
    from the same parts (Qwen3, Phi-3) subclass it and swap ``model_class``.
    """

    model_class: type[LlamaModel] = LlamaModel

    def __init__(self, hf_config: Any, attn_backend: AttentionBackend, ctx: LayerContext) -> None:
        super().__init__()
        self.config = hf_config
        self.model = self.model_class(hf_config, attn_backend, ctx)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.lm_head = LMHead(
            hf_config.vocab_size,
            hf_config.hidden_size,
            ctx,
            tied_embedding=self.model.embed_tokens if self.tie_word_embeddings else None,
        )
        attn = cast(LlamaDecoderLayer, self.model.layers[0]).self_attn.attn
        self.num_layers = hf_config.num_hidden_layers
        self.num_kv_heads = attn.num_kv_heads  # per rank: what this rank's cache holds
        self.head_dim = attn.head_dim
        self.vocab_size = hf_config.vocab_size

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary fp32 logits on every rank (the split head all-gathers them)."""
        return self.lm_head(hidden)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors in through each parameter's weight_loader.

        Raises ModelLoadError on an unknown name, a shape mismatch or a missing parameter, so a
        checkpoint of another architecture never loads half-way.
        """
        params = dict(self.named_parameters())
        owners = {
            f"{module_name}.{param_name}" if module_name else param_name: module
            for module_name, module in self.named_modules()
            for param_name, _ in module.named_parameters(recurse=False)
        }
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            target, shard_id = self._target(name)
            if target not in params:
                raise ModelLoadError(f"checkpoint tensor {name!r} has no place in this model")
            try:
                owners[target].weight_loader(params[target], tensor, shard_id)
            except ValueError as exc:
                raise ModelLoadError(f"checkpoint tensor {name!r}: {exc}") from exc
            loaded.add(target if shard_id is None else f"{target}:{shard_id}")
        expected = self._expected_loads(params)
        missing = sorted(expected - loaded)
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ModelLoadError(f"checkpoint is missing {len(missing)} tensors: {shown}")

    @staticmethod
    def _target(name: str) -> tuple[str, str | int | None]:
        """Checkpoint name -> (our parameter name, shard id or None)."""
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part in _STACKED_PARAMS:
                fused, shard_id = _STACKED_PARAMS[part]
                return ".".join(parts[:i] + [fused] + parts[i + 1 :]), shard_id
        return name, None

    @staticmethod
    def _expected_loads(params: dict[str, nn.Parameter]) -> set[str]:
        """Every (parameter, shard) a complete checkpoint fills."""
        shards: dict[str, list[str | int]] = {}
        for fused, shard_id in _STACKED_PARAMS.values():
            shards.setdefault(fused, []).append(shard_id)
        expected: set[str] = set()
        for name in params:
            fused = name.split(".")[-2]
            if fused in shards:
                expected.update(f"{name}:{shard_id}" for shard_id in shards[fused])
            else:
                expected.add(name)
        return expected
