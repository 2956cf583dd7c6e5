"""What a model family provides to the loader and the runner, whatever its architecture.

A family's class is built as ``cls(hf_config, attn_backend, ctx)`` (``ctx`` a LayerContext)
and registered in ``registry.py`` under the Hugging Face architecture names it implements.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Iterable

import torch
from torch import nn


class CausalLM(nn.Module, metaclass=ABCMeta):
    """A decoder over the paged KV cache, run inside the runner's forward context.

    The runner sizes the KV cache from the attributes: one cache per layer of
    ``[2, num_blocks, block_size, num_kv_heads, head_dim]``, ``num_kv_heads`` being this
    rank's share.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat step tokens [T] and their positions [T] -> final hidden states [T, hidden]."""

    @abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states of the rows to sample -> full-vocabulary fp32 logits."""

    @abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Fill every parameter from (checkpoint name, full tensor) pairs; ModelLoadError on a
        name, shape or tensor the model does not match."""
