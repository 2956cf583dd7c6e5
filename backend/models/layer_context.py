"""What every layer of one model shares: dtype, device, its tensor-parallel slot, the
linear method and the longest sequence the engine will run. One frozen value passed to each
constructor, so a new setting (the linear method was the first) reaches every layer without
touching their argument lists, and the tensor-parallel rank and size are validated once, here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pagedserve.backend.quantization.base import LinearMethod
from pagedserve.backend.quantization.unquantized import UnquantizedLinearMethod


@dataclass(frozen=True)
class LayerContext:
    dtype: torch.dtype
    device: torch.device
    tp_rank: int = 0
    tp_size: int = 1
    linear_method: LinearMethod = field(default_factory=UnquantizedLinearMethod)
    # The longest sequence (prompt and output) the engine will run; None: the model's own
    # limit, max_position_embeddings. Layers whose numbers depend on it read it (LongRoPE
    # picks its short or long factors by it).
    max_model_len: int | None = None

    def __post_init__(self) -> None:
        if self.tp_size < 1 or not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"invalid tensor-parallel rank {self.tp_rank} of size {self.tp_size}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")

    def new_parameter(self, shape: tuple[int, ...]) -> nn.Parameter:
        """An uninitialised frozen parameter of the model's dtype on its device (the loader
        fills every parameter; nothing trains)."""
        data = torch.empty(shape, dtype=self.dtype, device=self.device)
        return nn.Parameter(data, requires_grad=False)
