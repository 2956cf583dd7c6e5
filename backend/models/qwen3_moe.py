"""Qwen3-MoE decoder: Qwen3's attention (per-head q/k RMSNorm) with sparse MoE MLPs.

A layer is sparse unless ``mlp_only_layers`` lists it or its number (counted from one) is not
a multiple of ``decoder_sparse_step``; dense layers keep Qwen3's MLP of ``intermediate_size``.
Experts are ``moe_intermediate_size`` wide; top-k routing renormalises only when
``norm_topk_prob`` is set, and the weights are rounded to the model dtype before they scale
the experts (transformers 5's order). Qwen3-MoE has no shared expert.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pagedserve.backend.errors import ModelLoadError
from pagedserve.backend.models.layer_context import LayerContext
from pagedserve.backend.models.llama import LlamaMLP, LlamaModel
from pagedserve.backend.models.moe import (
    MoEConfig,
    MoEForCausalLM,
    MoEWeightNames,
    SparseMoEBlock,
)
from pagedserve.backend.models.qwen3 import Qwen3DecoderLayer


def num_experts_of(hf_config: Any) -> int:
    """transformers names the count ``num_experts`` in Qwen3-MoE configs, and some releases
    alias it to ``num_local_experts``."""
    count = getattr(hf_config, "num_experts", None) or getattr(hf_config, "num_local_experts", None)
    return int(count or 0)


def is_sparse_layer(hf_config: Any, layer_index: int) -> bool:
    step = int(getattr(hf_config, "decoder_sparse_step", 1) or 1)
    only_dense = set(getattr(hf_config, "mlp_only_layers", None) or [])
    return (
        layer_index not in only_dense
        and num_experts_of(hf_config) > 0
        and (layer_index + 1) % step == 0
    )


class Qwen3MoeDecoderLayer(Qwen3DecoderLayer):
    @classmethod
    def build_mlp(cls, hf_config: Any, layer_index: int, ctx: LayerContext) -> nn.Module:
        if not is_sparse_layer(hf_config, layer_index):
            return LlamaMLP(hf_config, ctx)
        if hf_config.hidden_act != "silu":
            raise ModelLoadError(f"activation {hf_config.hidden_act!r} is not supported (silu)")
        config = MoEConfig(
            num_experts=num_experts_of(hf_config),
            top_k=int(hf_config.num_experts_per_tok),
            hidden_size=hf_config.hidden_size,
            intermediate_size=int(hf_config.moe_intermediate_size),
            renormalize=bool(getattr(hf_config, "norm_topk_prob", False)),
            weights_in_model_dtype=True,
        )
        return SparseMoEBlock(config, layer_index, ctx)


class Qwen3MoeModel(LlamaModel):
    layer_class = Qwen3MoeDecoderLayer


class Qwen3MoeForCausalLM(MoEForCausalLM):
    """Checkpoint names are Qwen3's plus ``mlp.gate.weight`` (the router) and the experts'
    ``mlp.experts.{e}.{gate,up,down}_proj.weight``."""

    model_class = Qwen3MoeModel
    expert_names = MoEWeightNames(block="mlp", gate="gate_proj", up="up_proj", down="down_proj")
