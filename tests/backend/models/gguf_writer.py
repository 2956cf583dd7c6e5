"""Write a Hugging Face checkpoint as a GGUF file, the way llama.cpp's converter lays it out,
for the GGUF loading tests: GGUF tensor names from the ``gguf`` package's own name map, F32
tensors (so a round trip is exact), Llama's q/k rows permuted as llama.cpp stores them (the
reader undoes it), and the tokenizer fields copied from the embedded default model's GGUF (the
tiny test models share its vocabulary).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

from pagedserve.backend.models.default_model import locate_gguf

ARCHES = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen3": gguf.MODEL_ARCH.QWEN3}


def _llama_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (its rotary pairs adjacent dimensions)."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


@functools.cache
def _tokenizer_fields() -> tuple[tuple[str, Any, gguf.GGUFValueType], ...]:
    """The default model's tokenizer fields, read once (the reader parses the whole
    vocabulary: seconds)."""
    reader = gguf.GGUFReader(str(locate_gguf()))
    return tuple(
        (name, field.contents(), field.types[0])
        for name, field in reader.fields.items() if name.startswith("tokenizer.")
    )


def _copy_tokenizer(writer: gguf.GGUFWriter) -> None:
    for name, value, kind in _tokenizer_fields():
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_array(name, value)
        else:
            writer.add_key_value(name, value, kind)


def write_gguf(
    model_dir: Path, out: Path, arch: str, *, metadata: dict[str, int] | None = None,
    drop: tuple[str, ...] = (),
) -> Path:
    """``model_dir``'s config and single-file safetensors as GGUF ``arch`` at ``out``;
    ``metadata``: more ``{arch}.`` keys (integers) to write, e.g. a head size to test;
    ``drop``: checkpoint tensors to leave out (an incomplete file)."""
    config = json.loads((model_dir / "config.json").read_text())
    state = load_file(str(model_dir / "model.safetensors"))
    layers = config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(model_dir.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    rope = config.get("rope_parameters") or {}  # transformers 5; older configs: rope_theta
    writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, value in (metadata or {}).items():
        writer.add_uint32(f"{arch}.{key}", value)
    _copy_tokenizer(writer)
    names = gguf.get_tensor_name_map(ARCHES[arch], layers)
    # Tied embeddings have no lm_head tensor, and GGUF ties by leaving output.weight out.
    for name, tensor in state.items():
        if name in drop:
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, f"no GGUF name for {name}"
        array = tensor.to(torch.float32).numpy()
        if arch == "llama" and name.endswith("q_proj.weight"):
            array = _llama_permute(array, heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            array = _llama_permute(array, kv_heads)
        writer.add_tensor(gguf_name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
