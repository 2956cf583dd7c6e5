"""``--model FILE.gguf``: GGUF checkpoints of the architectures transformers reads in full,
dequantized once into a model directory, equal transformers on the original checkpoint; the
ones its reader would convert unfaithfully are refused with the reason.

The GGUF files are written here from tiny checkpoints (``gguf_writer``), in F32, so the round
trip is exact and the logits must match within the Llama tests' fp32 tolerance.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import gguf
import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.backend.config import ModelConfig
from pagedserve.backend.errors import ModelLoadError
from pagedserve.backend.models.loader import load_model
from pagedserve.backend.runner.attention import TorchAttentionBackend
from tests.backend.models.conftest import TINY_QWEN3
from tests.backend.models.gguf_writer import write_gguf
from tests.backend.models.paged_schedule import random_prompts
from tests.backend.models.test_llama_model import check_against_transformers

CPU = torch.device("cpu")
# Qwen3 with the head size of every released Qwen3 (128), which transformers' GGUF reader
# assumes: it never reads ``attention.key_length`` for Qwen3.
TINY_QWEN3_GGUF: dict[str, Any] = {**TINY_QWEN3, "head_dim": 128}


def _load_gguf(path: Path, cache: Path) -> Any:
    config = ModelConfig(model=str(path), cache_dir=cache)
    return load_model(config, CPU, torch.float32, TorchAttentionBackend())


@pytest.fixture(scope="module")
def gguf_files(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path, tiny_model_factory: Any
) -> dict[str, tuple[Path, Path, Path]]:
    """arch -> (the checkpoint it was written from, the GGUF file, a cache to convert into),
    shared by the tests below: transformers reads a GGUF's whole vocabulary on each of its
    four passes over the file, seconds each."""
    root = tmp_path_factory.mktemp("gguf")
    originals = {
        "llama": tiny_llama_dir,
        "qwen3": tiny_model_factory("tiny-qwen3-gguf", TINY_QWEN3_GGUF),
    }
    return {
        arch: (original, write_gguf(original, root / f"tiny-{arch}.F32.gguf", arch), root / "cache")
        for arch, original in originals.items()
    }


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_gguf_file_loads_and_matches_transformers_on_the_original(
    arch: str, gguf_files: dict[str, tuple[Path, Path, Path]]
) -> None:
    original, path, cache = gguf_files[arch]
    loaded = _load_gguf(path, cache)
    assert loaded.name == f"tiny-{arch}.F32"
    assert loaded.hf_config.model_type == arch
    prompts = random_prompts([5, 33, 70], loaded.model.vocab_size, seed=3)
    # The reference reads the checkpoint the GGUF was written from, not our conversion.
    check_against_transformers(
        dataclasses.replace(loaded, model_dir=original), prompts, chunked_len=70,
        first_chunk=20, decode_steps=3, block_size=16, seed=4,
    )
    # Converted once: a second load reuses the directory.
    converted = loaded.model_dir
    assert converted is not None and converted.parent == cache / "models" / "gguf"
    mtime = (converted / "model.safetensors").stat().st_mtime_ns
    again = _load_gguf(path, cache)
    assert again.model_dir == converted
    assert (converted / "model.safetensors").stat().st_mtime_ns == mtime


def test_the_engine_serves_a_gguf_file(
    tiny_llama_dir: Path, gguf_files: dict[str, tuple[Path, Path, Path]]
) -> None:
    _, path, cache = gguf_files["llama"]
    llm = LLM(str(path), dtype="float32", device="cpu", cache_dir=str(cache))
    assert llm.engine.model_info.name == "tiny-llama.F32"
    from_dir = LLM(str(tiny_llama_dir), dtype="float32", device="cpu")
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompt = [[1, 400, 500, 600]]
    assert (llm.generate(prompt_token_ids=prompt, sampling_params=params)[0].token_ids
            == from_dir.generate(prompt_token_ids=prompt, sampling_params=params)[0].token_ids)


def _metadata_only(path: Path, arch: str, **fields: int) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in fields.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    "arch,reason",
    [
        ("gemma2", "drops attention soft-capping"),
        ("phi3", "drops LongRoPE"),
        ("qwen3moe", "drops the experts' intermediate size"),
        ("falcon", "architecture 'falcon' is not supported"),
    ],
)
def test_gguf_files_transformers_cannot_convert_faithfully_are_refused(
    arch: str, reason: str, tmp_path: Path
) -> None:
    path = _metadata_only(tmp_path / f"{arch}.gguf", arch)
    with pytest.raises(ModelLoadError, match=reason):
        _load_gguf(path, tmp_path / "cache")
    assert not (tmp_path / "cache" / "models" / "gguf").exists() or not any(
        p.name.startswith(arch) and p.is_dir() for p in (tmp_path / "cache" / "models" / "gguf").iterdir()
    )


def test_a_head_size_transformers_would_lose_is_refused(
    tiny_model_factory: Any, tmp_path: Path
) -> None:
    """TINY_QWEN3's head size is 32: transformers would build 128-wide heads (it never reads
    Qwen3's key_length) and then fail on every attention tensor. The conversion says why."""
    original = tiny_model_factory("tiny-qwen3", TINY_QWEN3)
    path = write_gguf(original, tmp_path / "qwen3.gguf", "qwen3",
                      metadata={"attention.key_length": 32, "attention.value_length": 32})
    with pytest.raises(ModelLoadError, match=r"heads are 32 wide but transformers' GGUF reader builds 128"):
        _load_gguf(path, tmp_path / "cache")


def test_a_file_missing_a_tensor_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """transformers would fill the missing tensor at random and warn; the conversion refuses
    and leaves nothing in the cache."""
    path = write_gguf(tiny_llama_dir, tmp_path / "incomplete.gguf", "llama",
                      drop=("model.layers.1.mlp.down_proj.weight",))
    with pytest.raises(ModelLoadError, match=r"did not map every tensor .*missing: model\.layers\.1\.mlp\.down_proj"):
        _load_gguf(path, tmp_path / "cache")
    assert not any((tmp_path / "cache" / "models" / "gguf").glob("incomplete-*/config.json"))


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        _load_gguf(path, tmp_path / "cache")
