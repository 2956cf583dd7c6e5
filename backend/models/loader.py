"""Turns a ModelConfig into a ready model, its tokenizer and its stop tokens.

Only local directories are read (every transformers call passes ``local_files_only``), so a
typo in a path fails fast with a ModelLoadError instead of trying the network.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from safetensors import safe_open
from torch import nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from pagedserve.backend.config import DEFAULT_MODEL_NAME, ModelConfig
from pagedserve.backend.errors import ModelLoadError
from pagedserve.backend.models.default_model import default_model_dir, gguf_model_dir
from pagedserve.backend.models.interface import CausalLM
from pagedserve.backend.models.layer_context import LayerContext
from pagedserve.backend.models.layers import FullShapes, RMSNorm, ShardedLinear
from pagedserve.backend.models.registry import resolve_model_class
from pagedserve.backend.runner.attention import AttentionBackend

logger = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_BIN_INDEX = "pytorch_model.bin.index.json"
_BIN_FILE = "pytorch_model.bin"
# Standard deviation of dummy weights when the config names none.
_DEFAULT_INIT_STD = 0.02
_LOAD_FORMATS = ("auto", "safetensors", "dummy")
# A --model file with this suffix is a GGUF checkpoint (dequantized once, then a directory).
GGUF_SUFFIX = ".gguf"


@dataclass
class LoadedModel:
    model: CausalLM
    hf_config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    eos_token_ids: list[int]
    model_dir: Path | None
    name: str
    max_model_len: int


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is fp32 on CPU (no fast bf16 GEMMs there) and bf16 on accelerators."""
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r} (choose auto, {', '.join(_DTYPES)})")
    return _DTYPES[dtype]


def load_model(
    model_config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    attn_backend: AttentionBackend,
    tp_rank: int = 0,
    tp_size: int = 1,
) -> LoadedModel:
    """Builds rank ``tp_rank``'s shard of the model (of ``tp_size``) on ``device`` in ``dtype``,
    of the class the registry names for the config, and fills it (checkpoint or dummy weights).

    Every failure that a wrong path, file, config or split can cause surfaces as ModelLoadError.
    """
    if model_config.load_format not in _LOAD_FORMATS:
        raise ModelLoadError(
            f"unknown load_format {model_config.load_format!r} (choose {', '.join(_LOAD_FORMATS)})"
        )
    dummy = model_config.load_format == "dummy"
    model_dir = _model_dir(model_config)
    hf_config = _load_config(model_dir, model_config.hf_overrides)
    max_model_len = _max_model_len(hf_config, model_config.max_model_len)

    model_class = resolve_model_class(hf_config)
    try:
        ctx = LayerContext(dtype, device, tp_rank, tp_size, max_model_len=max_model_len)
        model = model_class(hf_config, attn_backend, ctx)
    except NotImplementedError as exc:  # e.g. a RoPE scaling type we do not implement
        raise ModelLoadError(f"unsupported model configuration: {exc}") from exc
    except ValueError as exc:  # e.g. heads not divisible by the tensor-parallel size
        raise ModelLoadError(f"cannot split the model over {tp_size} ranks: {exc}") from exc
    if dummy:
        _init_dummy_weights(model, hf_config, model_config.seed)
    else:
        assert model_dir is not None
        model.load_weights(_iter_checkpoint(model_dir, model_config.load_format))
    for module in model.modules():
        if isinstance(module, ShardedLinear):
            module.linear_method.process_weights_after_loading(module)
    model.eval()

    tokenizer_dir = model_dir if model_dir and _has_tokenizer(model_dir) else None
    if tokenizer_dir is None:
        if not dummy:
            raise ModelLoadError(f"{model_dir} has no tokenizer files")
        tokenizer_dir = default_model_dir(model_config.cache_dir)
    tokenizer = _load_tokenizer(tokenizer_dir)
    eos_token_ids = _eos_token_ids(model_dir or tokenizer_dir, hf_config, tokenizer)

    if model_config.served_model_name:
        name = model_config.served_model_name
    elif model_config.model is None and model_dir is not None:
        name = DEFAULT_MODEL_NAME
    elif model_config.model is not None and model_config.model.endswith(GGUF_SUFFIX):
        name = Path(model_config.model).stem
    elif model_dir is not None:
        name = model_dir.name
    else:
        name = f"dummy-{hf_config.model_type}"
    logger.info(
        "loaded %s (%s, %s, %s weights) on %s",
        name,
        hf_config.model_type,
        dtype,
        "dummy" if dummy else "checkpoint",
        device,
    )
    return LoadedModel(
        model=model,
        hf_config=hf_config,
        tokenizer=tokenizer,
        eos_token_ids=eos_token_ids,
        model_dir=model_dir,
        name=name,
        max_model_len=max_model_len,
    )


def _model_dir(model_config: ModelConfig) -> Path | None:
    """The directory to read, or None for a dummy model described by hf_overrides alone."""
    if model_config.model is None:
        if model_config.load_format == "dummy" and model_config.hf_overrides:
            return None
        return default_model_dir(model_config.cache_dir)
    path = Path(model_config.model).expanduser()
    if path.suffix == GGUF_SUFFIX and path.is_file():
        return gguf_model_dir(path, model_config.cache_dir)
    if not path.is_dir():
        raise ModelLoadError(
            f"model path {model_config.model!r} is not a directory or a .gguf file (pagedserve "
            "loads local Hugging Face model directories and GGUF files; it does not download "
            "from the hub)"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model directory {path} has no config.json")
    return path


def _load_config(model_dir: Path | None, overrides: dict[str, Any]) -> PretrainedConfig:
    """The directory's config with ``overrides`` applied; without a directory, the overrides
    are the whole config (they must then name ``model_type``)."""
    try:
        if model_dir is None:
            settings = dict(overrides)
            model_type = settings.pop("model_type", None)
            if model_type is None:
                raise ModelLoadError("hf_overrides for a dummy model must include 'model_type'")
            return AutoConfig.for_model(model_type, **settings)
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        source = model_dir if model_dir is not None else "hf_overrides"
        raise ModelLoadError(f"cannot build the model config from {source}: {exc}") from exc
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _max_model_len(hf_config: PretrainedConfig, requested: int | None) -> int:
    """Bounded by the position table (a sliding window bounds what a layer reads, not how
    long a sequence may grow)."""
    limit = int(hf_config.max_position_embeddings)
    if requested is None:
        return limit
    if requested > limit:
        raise ModelLoadError(
            f"max_model_len {requested} exceeds the model's limit of {limit} tokens "
            "(max_position_embeddings)"
        )
    if requested < 1:
        raise ModelLoadError(f"max_model_len must be positive, got {requested}")
    return requested


def _checkpoint_files(model_dir: Path, load_format: str) -> tuple[list[Path], str]:
    """The weight files to read and their kind ("safetensors" or "bin")."""
    index = model_dir / _SAFETENSORS_INDEX
    if index.is_file():
        return _indexed_files(model_dir, index), "safetensors"
    # Mistral repositories also ship their native "consolidated" checkpoint beside the HF one.
    found = sorted(
        p for p in model_dir.glob("*.safetensors") if not p.name.startswith("consolidated")
    )
    if found:
        return found, "safetensors"
    if load_format == "auto":
        bin_index = model_dir / _BIN_INDEX
        if bin_index.is_file():
            return _indexed_files(model_dir, bin_index), "bin"
        if (model_dir / _BIN_FILE).is_file():
            return [model_dir / _BIN_FILE], "bin"
    raise ModelLoadError(
        f"no {'weight' if load_format == 'auto' else load_format} files in {model_dir}"
    )


def _indexed_files(model_dir: Path, index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"unreadable checkpoint index {index}: {exc}") from exc
    files = [model_dir / name for name in sorted(set(weight_map.values()))]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise ModelLoadError(f"checkpoint shards listed in {index.name} are missing: {absent}")
    return files


def _iter_checkpoint(model_dir: Path, load_format: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, CPU tensor) pairs, one file at a time so peak host memory stays one shard."""
    files, kind = _checkpoint_files(model_dir, load_format)
    for path in files:
        try:
            if kind == "safetensors":
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)
            else:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                yield from state.items()
        except (OSError, RuntimeError) as exc:
            raise ModelLoadError(f"cannot read checkpoint file {path}: {exc}") from exc


class _LoadsWeights(Protocol):
    """What every layer that owns parameters provides to the loader (see layers.py)."""

    def full_shapes(self, param: nn.Parameter) -> FullShapes: ...

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None
    ) -> None: ...


@torch.no_grad()
def _init_dummy_weights(model: CausalLM, hf_config: PretrainedConfig, seed: int) -> None:
    """Random weights of the config's init scale, reproducible from ``seed``: norms start
    where training starts them (``RMSNorm.initial_value``), everything else
    normal(0, initializer_range).

    Each full checkpoint tensor is drawn from its own generator (seeded from ``seed`` and its
    name) and then sliced by the parameter's weight loader, so every tensor-parallel split of
    the model holds pieces of the same weights.
    """
    std = float(getattr(hf_config, "initializer_range", None) or _DEFAULT_INIT_STD)
    norm_starts = {
        id(m.weight): m.initial_value for m in model.modules() if isinstance(m, RMSNorm)
    }
    owners = {
        id(param): cast(_LoadsWeights, module)  # every parameter's owner is one of our layers
        for module in model.modules()
        for param in module.parameters(recurse=False)
    }
    for name, param in model.named_parameters():
        owner = owners[id(param)]
        for shard_id, shape in owner.full_shapes(param).items():
            if id(param) in norm_starts:
                full = torch.full(shape, norm_starts[id(param)])
            else:
                # CPU generators keep only 32 bits of a seed: fold seed and name into those.
                key = f"{seed}/{name}:{shard_id}".encode()
                generator = torch.Generator().manual_seed(zlib.crc32(key))
                full = torch.randn(shape, generator=generator, dtype=torch.float32) * std
            owner.weight_loader(param, full, shard_id)


def _has_tokenizer(model_dir: Path) -> bool:
    return any(
        (model_dir / name).is_file()
        for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    )


def _load_tokenizer(tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer from {tokenizer_dir}: {exc}") from exc


def _eos_token_ids(
    model_dir: Path, hf_config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase
) -> list[int]:
    """Stop tokens: generation_config.json first (chat models list several there), then the
    model config, then the tokenizer."""
    candidates: Any = None
    if (model_dir / "generation_config.json").is_file():
        try:
            generation_config = GenerationConfig.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(
                f"unreadable generation_config.json in {model_dir}: {exc}"
            ) from exc
        candidates = generation_config.eos_token_id
    if candidates is None:
        candidates = getattr(hf_config, "eos_token_id", None)
    if candidates is None:
        candidates = tokenizer.eos_token_id
    if candidates is None:
        return []
    ids = [candidates] if isinstance(candidates, int) else list(candidates)
    return list(dict.fromkeys(int(i) for i in ids))
