"""The interface every linear layer calls for its weight: the seam quantized formats plug into.

A layer (``ShardedLinear`` and its column, merged, qkv and row parallel subclasses) owns what
tensor parallelism needs: its sizes, its bias, the weight loaders that cut this rank's slice
out of a checkpoint tensor, and the all-reduce. What the weight is and how it multiplies is
the method's:

- ``create_weights`` registers ``layer.weight`` and anything that lives beside it. fp8 adds a
  ``weight_scale`` there; ``output_sizes`` lists the projections fused in the layer (q, k, v or
  gate, up) because fp8 checkpoints carry one scale per projection, not per fused weight.
- ``process_weights_after_loading`` runs once the checkpoint is in (the loader calls it for
  every linear layer). fp8 quantizes a bf16 checkpoint there, so the loaders keep copying
  plain model-dtype tensors, or merges the per-projection scales of an fp8 checkpoint.
- ``apply`` is the GEMM. Multi-LoRA wraps a base method: its ``apply`` returns the base
  method's result plus the active adapters' ``x A^T B^T`` (so LoRA runs over fp8 or plain
  weights alike), and its ``create_weights`` also registers the adapter slots.

The embedding and the LM head are not linear layers in this sense and keep the model dtype in
every format (fp8 serving quantizes the decoder's projections, not the vocabulary matrix).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from pagedserve.backend.models.layer_context import LayerContext


class LinearMethod(Protocol):
    def create_weights(
        self, layer: nn.Module, input_size: int, output_sizes: Sequence[int], ctx: LayerContext
    ) -> None:
        """Register ``layer.weight`` for this rank's ``[sum(output_sizes), input_size]`` slice
        (and any scales) as parameters on ``ctx.device``."""
        ...

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Turn the loaded checkpoint tensors into the form ``apply`` reads."""
        ...

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W^T + bias`` for this rank's slice ``W``; ``x`` is ``[..., input_size]``."""
        ...
