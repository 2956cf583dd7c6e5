"""The paged KV cache's tensors: how many blocks fit, and their allocation.

Layout, per layer: ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (index 0 is K, 1 is
V). On CUDA the block count comes from the memory left after a profiling forward of a full
token budget, times ``gpu_memory_utilization``; on the CPU from ``cpu_kv_cache_gib``;
``num_blocks`` overrides both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pagedserve.backend.config import CacheConfig
from pagedserve.backend.errors import ModelLoadError

GIB = 1 << 30


@dataclass(frozen=True)
class KVCacheShape:
    """What one rank's cache holds per block (its share of the KV heads)."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def block_bytes(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    def allocate(self, num_blocks: int) -> list[torch.Tensor]:
        shape = (2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        return [
            torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)
        ]


def num_kv_blocks(
    shape: KVCacheShape,
    config: CacheConfig,
    max_model_len: int,
    profile_step: Callable[[], None],
) -> int:
    """Blocks that fit the memory budget; an error when they cannot hold one sequence of
    max_model_len (every request would be refused, or the engine would thrash).
    ``profile_step`` runs the largest step the engine will run (CUDA only)."""
    if config.num_blocks is not None:
        return config.num_blocks
    if shape.device.type != "cuda":
        blocks = int(config.cpu_kv_cache_gib * GIB // shape.block_bytes)
        budget = f"cpu_kv_cache_gib={config.cpu_kv_cache_gib}"
    else:
        blocks = _gpu_blocks(shape, config, profile_step)
        budget = f"gpu_memory_utilization={config.gpu_memory_utilization}"
    needed = -(-max_model_len // shape.block_size)
    if blocks < needed:
        raise ModelLoadError(
            f"the KV cache budget ({budget}) holds {max(blocks, 0)} blocks of "
            f"{shape.block_size} tokens, fewer than one sequence of max_model_len="
            f"{max_model_len} needs ({needed}): raise the budget or lower max_model_len"
        )
    return blocks


def _gpu_blocks(shape: KVCacheShape, config: CacheConfig, profile_step: Callable[[], None]) -> int:
    # What a full-budget step needs beyond the weights: measured, not guessed.
    device = shape.device
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    profile_step()
    activation_peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    budget = free - (1 - config.gpu_memory_utilization) * total - activation_peak
    return int(budget // shape.block_bytes)
