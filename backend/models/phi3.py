"""Phi-3 decoder (Phi-3, Phi-3.5, Phi-4 dense): Llama's layers with fused checkpoint
projections, LongRoPE and partial rotary embeddings.

Phi-3 checkpoints store ``self_attn.qkv_proj`` ([q | k | v] rows) and ``mlp.gate_up_proj``
([gate | up] rows) already fused. Our layers are fused too, but each rank holds only its slice
of every projection, so a fused checkpoint tensor is cut back into q, k, v (gate, up) at load
time and each part goes through the sharding weight loader as Llama's separate tensors would.

RoPE: ``longrope`` (``su`` in early configs) with short and long rescale factors and the
attention factor transformers derives from ``max_position_embeddings /
original_max_position_embeddings``; which set of factors applies is fixed for the whole model
by the engine's ``max_model_len`` (see ``layers._rope_frequencies``). ``partial_rotary_factor``
(Phi-4-mini) rotates only the first dims of each head.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from pagedserve.backend.errors import ModelLoadError
from pagedserve.backend.models.layer_context import LayerContext
from pagedserve.backend.models.layers import RotaryEmbedding, rope_parameters
from pagedserve.backend.models.llama import LlamaForCausalLM, LlamaModel, head_dim_of


class Phi3Model(LlamaModel):
    @staticmethod
    def rotary_embedding(hf_config: Any, ctx: LayerContext) -> RotaryEmbedding:
        params = rope_parameters(hf_config)
        head_dim = head_dim_of(hf_config)
        rotary_dim = int(head_dim * float(params.get("partial_rotary_factor", 1.0)))
        return RotaryEmbedding(
            head_dim, hf_config.max_position_embeddings, params, ctx, rotary_dim=rotary_dim
        )


class Phi3ForCausalLM(LlamaForCausalLM):
    model_class = Phi3Model

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Phi-3's fused tensors are split into Llama's checkpoint names on the way in."""
        super().load_weights(self._unfused(weights))

    def _unfused(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        config = self.config
        head_dim = head_dim_of(config)
        q_size = config.num_attention_heads * head_dim
        kv_size = (config.num_key_value_heads or config.num_attention_heads) * head_dim
        inter = config.intermediate_size
        parts = {
            "qkv_proj": (("q_proj", q_size), ("k_proj", kv_size), ("v_proj", kv_size)),
            "gate_up_proj": (("gate_proj", inter), ("up_proj", inter)),
        }
        for name, tensor in weights:
            prefix, _, rest = name.rpartition(".")  # rest: "weight" (Phi-3 has no biases)
            module_prefix, _, fused = prefix.rpartition(".")
            if fused not in parts:
                yield name, tensor
                continue
            sizes = [size for _, size in parts[fused]]
            if tensor.dim() == 0 or tensor.shape[0] != sum(sizes):
                raise ModelLoadError(
                    f"checkpoint tensor {name!r} has {tuple(tensor.shape)}; expected "
                    f"{sum(sizes)} rows ({' + '.join(map(str, sizes))})"
                )
            for (part, _), piece in zip(parts[fused], tensor.split(sizes, dim=0)):
                yield f"{module_prefix}.{part}.{rest}", piece
