"""Mixtral decoder: Mistral's layers (Llama attention, no biases) with a sparse MoE MLP in
every layer.

Routing: softmax over the ``num_local_experts`` in fp32, top ``num_experts_per_tok``, always
renormalised over the k, the weights kept in fp32 (transformers 5's order). Experts are
``intermediate_size`` wide. Published checkpoints name the block ``block_sparse_moe`` and the
expert projections ``w1`` (gate), ``w3`` (up), ``w2`` (down); transformers 5 calls the block
``mlp`` in memory. Both load.

Attention here is full, not windowed: a config with a ``sliding_window`` is refused rather
than served with attention the model was not trained with (Mixtral's configs set none).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pagedserve.backend.errors import ModelLoadError
from pagedserve.backend.models.layer_context import LayerContext
from pagedserve.backend.models.llama import LlamaDecoderLayer, LlamaModel
from pagedserve.backend.models.moe import (
    MoEConfig,
    MoEForCausalLM,
    MoEWeightNames,
    SparseMoEBlock,
)


class MixtralDecoderLayer(LlamaDecoderLayer):
    @classmethod
    def build_mlp(cls, hf_config: Any, layer_index: int, ctx: LayerContext) -> nn.Module:
        if hf_config.hidden_act != "silu":
            raise ModelLoadError(f"activation {hf_config.hidden_act!r} is not supported (silu)")
        config = MoEConfig(
            num_experts=int(hf_config.num_local_experts),
            top_k=int(hf_config.num_experts_per_tok),
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            renormalize=True,
            weights_in_model_dtype=False,
        )
        return SparseMoEBlock(config, layer_index, ctx)


class MixtralModel(LlamaModel):
    layer_class = MixtralDecoderLayer


class MixtralForCausalLM(MoEForCausalLM):
    model_class = MixtralModel
    expert_names = MoEWeightNames(
        block="mlp", gate="w1", up="w3", down="w2", aliases=("block_sparse_moe",)
    )

