"""Model loading: checkpoint formats, dummy weights, stop tokens, limits and typed errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedserve.backend.config import DEFAULT_MODEL_NAME, ModelConfig
from pagedserve.backend.errors import ModelLoadError
from pagedserve.backend.models.loader import LoadedModel, load_model, resolve_dtype
from pagedserve.backend.runner.attention import (
    AttentionMetadata,
    TorchAttentionBackend,
    forward_context,
)

CPU = torch.device("cpu")


def _load(**kwargs: object) -> LoadedModel:
    return load_model(ModelConfig(**kwargs), CPU, torch.float32, TorchAttentionBackend())


def _prefill_logits(loaded: LoadedModel, token_ids: list[int]) -> torch.Tensor:
    """Logits of one prompt through a contiguous single-block cache."""
    model = loaded.model
    n = len(token_ids)
    caches = [
        torch.zeros(2, 1, n, model.num_kv_heads, model.head_dim) for _ in range(model.num_layers)
    ]
    metadata = AttentionMetadata.single_prefill(n, block_size=n, device="cpu")
    with torch.no_grad(), forward_context(metadata, caches):
        return model.compute_logits(model(torch.tensor(token_ids), torch.arange(n)))


def _copy_model_dir(src: Path, dst: Path, weights: bool = True) -> Path:
    dst.mkdir()
    for path in src.iterdir():
        if weights or not path.name.startswith("model"):
            shutil.copy(path, dst / path.name)
    return dst


PROMPT = [1, 4093, 198, 1780, 314, 260, 3575, 282]


def test_directory_load_fills_result(tiny_llama_dir: Path) -> None:
    loaded = _load(model=str(tiny_llama_dir))
    assert loaded.model_dir == tiny_llama_dir
    assert loaded.name == tiny_llama_dir.name
    assert loaded.max_model_len == 1024
    assert loaded.eos_token_ids == [2]
    assert loaded.tokenizer.decode([2]) == "<|im_end|>"
    assert loaded.model.num_layers == 2
    assert loaded.model.num_kv_heads == 2 and loaded.model.head_dim == 16
    assert loaded.model.vocab_size == 49152
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    named = _load(model=str(tiny_llama_dir), served_model_name="mine", max_model_len=100)
    assert named.name == "mine" and named.max_model_len == 100


def test_sharded_checkpoint_loads_every_shard(tiny_qwen2_dir: Path) -> None:
    index = json.loads((tiny_qwen2_dir / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1, "fixture must be sharded to cover the index path"
    loaded = _load(model=str(tiny_qwen2_dir))
    expected = {}
    for shard in shards:
        expected.update(load_file(str(tiny_qwen2_dir / shard)))
    model = loaded.model
    attn = model.model.layers[2].self_attn.qkv_proj
    q = expected["model.layers.2.self_attn.q_proj.bias"]
    v = expected["model.layers.2.self_attn.v_proj.bias"]
    assert torch.equal(attn.bias[: q.numel()], q)
    assert torch.equal(attn.bias[-v.numel() :], v)
    assert torch.equal(model.lm_head.weight, expected["lm_head.weight"])
    assert model.model.layers[0].self_attn.o_proj.bias is None


def test_pytorch_bin_checkpoint_gives_same_logits(tiny_llama_dir: Path, tmp_path: Path) -> None:
    bin_dir = _copy_model_dir(tiny_llama_dir, tmp_path / "bin", weights=False)
    torch.save(load_file(str(tiny_llama_dir / "model.safetensors")), bin_dir / "pytorch_model.bin")
    from_bin = _prefill_logits(_load(model=str(bin_dir)), PROMPT)
    from_st = _prefill_logits(_load(model=str(tiny_llama_dir)), PROMPT)
    assert torch.equal(from_bin, from_st)
    with pytest.raises(ModelLoadError, match="no safetensors files"):
        _load(model=str(bin_dir), load_format="safetensors")


def test_dummy_weights_are_seeded_random(tiny_llama_dir: Path) -> None:
    real = _load(model=str(tiny_llama_dir))
    a = _load(model=str(tiny_llama_dir), load_format="dummy", seed=1)
    b = _load(model=str(tiny_llama_dir), load_format="dummy", seed=1)
    c = _load(model=str(tiny_llama_dir), load_format="dummy", seed=2)
    wa = a.model.model.layers[0].mlp.gate_up_proj.weight
    assert torch.equal(wa, b.model.model.layers[0].mlp.gate_up_proj.weight)
    assert not torch.equal(wa, c.model.model.layers[0].mlp.gate_up_proj.weight)
    assert not torch.equal(wa, real.model.model.layers[0].mlp.gate_up_proj.weight)
    # Scale follows the config's initializer_range (0.15 for the tiny models); norms start at 1.
    assert abs(wa.std().item() - 0.15) < 0.01
    assert torch.equal(a.model.model.norm.weight, torch.ones(64))
    assert torch.isfinite(_prefill_logits(a, PROMPT)).all()


def test_dummy_from_config_dict_uses_default_tokenizer(default_model_dir: Path) -> None:
    overrides = {
        "model_type": "qwen2",
        "vocab_size": 49152,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 256,
    }
    loaded = _load(load_format="dummy", hf_overrides=overrides)
    assert loaded.model_dir is None
    assert loaded.name == "dummy-qwen2"
    assert loaded.max_model_len == 256
    assert loaded.model.num_layers == 1 and loaded.model.head_dim == 16
    assert loaded.model.model.layers[0].self_attn.qkv_proj.bias is not None
    assert loaded.tokenizer.chat_template  # the default model's tokenizer, chat template included
    assert loaded.eos_token_ids == [2]
    logits = _prefill_logits(loaded, PROMPT)
    assert logits.shape == (len(PROMPT), 49152) and torch.isfinite(logits).all()
    with pytest.raises(ModelLoadError, match="model_type"):
        _load(load_format="dummy", hf_overrides={"hidden_size": 32})
    with pytest.raises(ModelLoadError, match="hf_overrides"):
        _load(load_format="dummy", hf_overrides={"model_type": "no-such-model"})


def test_overrides_apply_on_top_of_a_directory(tiny_llama_dir: Path) -> None:
    loaded = _load(
        model=str(tiny_llama_dir), load_format="dummy", hf_overrides={"num_hidden_layers": 1}
    )
    assert loaded.model.num_layers == 1


def test_default_model_loads_by_default(default_model_dir: Path) -> None:
    loaded = _load()
    assert loaded.model_dir == default_model_dir
    assert loaded.name == DEFAULT_MODEL_NAME
    assert loaded.max_model_len == 8192
    assert loaded.eos_token_ids == [2]
    assert loaded.model.num_layers == 30
    assert (loaded.model.num_kv_heads, loaded.model.head_dim) == (3, 64)
    assert "<|im_start|>assistant" in loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )


def test_eos_ids_come_from_generation_config_then_config(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    listed = _copy_model_dir(tiny_llama_dir, tmp_path / "listed")
    gen = json.loads((listed / "generation_config.json").read_text())
    gen["eos_token_id"] = [2, 0, 2]
    (listed / "generation_config.json").write_text(json.dumps(gen))
    assert _load(model=str(listed)).eos_token_ids == [2, 0]

    no_gen = _copy_model_dir(tiny_llama_dir, tmp_path / "no_gen")
    (no_gen / "generation_config.json").unlink()
    config = json.loads((no_gen / "config.json").read_text())
    config["eos_token_id"] = 0
    (no_gen / "config.json").write_text(json.dumps(config))
    assert _load(model=str(no_gen)).eos_token_ids == [0]


def test_sliding_window_no_longer_bounds_max_model_len(tiny_mistral_dir: Path) -> None:
    """Windows are run by the attention path, so only the position table bounds the length."""
    loaded = _load(model=str(tiny_mistral_dir), load_format="dummy")
    assert loaded.max_model_len == 1024
    assert loaded.model.model.layers[0].self_attn.attn.sliding_window == 512
    assert _load(model=str(tiny_mistral_dir), load_format="dummy", max_model_len=600).max_model_len == 600
    with pytest.raises(ModelLoadError, match="exceeds the model's limit of 1024"):
        _load(model=str(tiny_mistral_dir), load_format="dummy", max_model_len=1025)


def test_bad_paths_and_files_raise_model_load_error(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a directory"):
        _load(model=str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="not a directory"):
        _load(model="meta-llama/Llama-3.1-8B")  # hub ids are not fetched
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        _load(model=str(empty))

    no_weights = _copy_model_dir(tiny_llama_dir, tmp_path / "no_weights", weights=False)
    with pytest.raises(ModelLoadError, match="no weight files"):
        _load(model=str(no_weights))

    broken_json = _copy_model_dir(tiny_llama_dir, tmp_path / "broken_json", weights=False)
    (broken_json / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config"):
        _load(model=str(broken_json))

    gpt2 = _copy_model_dir(tiny_llama_dir, tmp_path / "gpt2", weights=False)
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="'gpt2' is not supported"):
        _load(model=str(gpt2))

    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama_dir / name, no_tok / name)
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        _load(model=str(no_tok))

    with pytest.raises(ModelLoadError, match="max_model_len 2000 exceeds"):
        _load(model=str(tiny_llama_dir), max_model_len=2000)
    with pytest.raises(ModelLoadError, match="rope scaling type 'yarn'"):
        _load(
            model=str(tiny_llama_dir),
            load_format="dummy",
            hf_overrides={
                "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}
            },
        )
    with pytest.raises(ModelLoadError, match="activation 'gelu'"):
        _load(model=str(tiny_llama_dir), load_format="dummy", hf_overrides={"hidden_act": "gelu"})
    with pytest.raises(ModelLoadError, match="load_format"):
        _load(model=str(tiny_llama_dir), load_format="gguf")


def _rewrite_weights(src: Path, dst: Path, edit: dict[str, torch.Tensor | None]) -> Path:
    _copy_model_dir(src, dst, weights=False)
    state = load_file(str(src / "model.safetensors"))
    for name, tensor in edit.items():
        if tensor is None:
            del state[name]
        else:
            state[name] = tensor
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_incompatible_checkpoints_raise_model_load_error(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    key = "model.layers.1.self_attn.k_proj.weight"
    missing = _rewrite_weights(tiny_llama_dir, tmp_path / "missing", {key: None})
    with pytest.raises(ModelLoadError, match=r"missing 1 tensors: .*qkv_proj.weight:k"):
        _load(model=str(missing))
    wrong_shape = _rewrite_weights(tiny_llama_dir, tmp_path / "shape", {key: torch.zeros(16, 64)})
    with pytest.raises(ModelLoadError, match="k_proj.weight.*shape mismatch"):
        _load(model=str(wrong_shape))
    extra = _rewrite_weights(
        tiny_llama_dir, tmp_path / "extra", {"model.extra.weight": torch.zeros(2)}
    )
    with pytest.raises(ModelLoadError, match="no place"):
        _load(model=str(extra))
    # Old checkpoints carry the RoPE buffer; it is recomputed, not loaded.
    inv_freq = _rewrite_weights(
        tiny_llama_dir,
        tmp_path / "inv_freq",
        {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8)},
    )
    assert _load(model=str(inv_freq)).model.num_layers == 2


def test_resolve_dtype() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    assert resolve_dtype("bfloat16", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_dtype("int8", torch.device("cpu"))


def test_reduced_precision_load_casts_weights(tiny_llama_dir: Path) -> None:
    loaded = load_model(
        ModelConfig(model=str(tiny_llama_dir)), CPU, torch.bfloat16, TorchAttentionBackend()
    )
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    logits = _prefill_logits(loaded, PROMPT)
    reference = _prefill_logits(_load(model=str(tiny_llama_dir)), PROMPT)
    assert logits.dtype == torch.float32
    # bf16 keeps 8 mantissa bits: the argmax of most rows survives.
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.75
