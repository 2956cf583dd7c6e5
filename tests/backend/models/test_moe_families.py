"""Mixtral and Qwen3-MoE against transformers: logits over a paged schedule, the engine's
greedy tokens with chunked prefill and preemption, and both checkpoint layouts of the experts.

The tiny models have 8 experts, top-2 routing and random norm weights. Qwen3-MoE also has a
dense layer among its sparse ones (``mlp_only_layers``), and a second variant without
renormalised top-k weights whose sparse layers are every other one (``decoder_sparse_step``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from pagedserve.backend.config import ModelConfig
from pagedserve.backend.errors import ModelLoadError
from pagedserve.backend.models.llama import LlamaMLP
from pagedserve.backend.models.loader import LoadedModel, load_model
from pagedserve.backend.models.mixtral import MixtralForCausalLM
from pagedserve.backend.models.moe import SparseMoEBlock, observe_routing
from pagedserve.backend.models.qwen3_moe import Qwen3MoeForCausalLM
from pagedserve.backend.runner.attention import TorchAttentionBackend
from tests.backend.engine.test_engine_vs_transformers import run_and_compare
from tests.backend.models.conftest import (
    TINY_MIXTRAL,
    TINY_QWEN3_MOE,
    TINY_QWEN3_MOE_UNNORMALISED,
    randomize_norms,
)
from tests.backend.models.paged_schedule import random_prompts, run_schedule
from tests.backend.models.test_families import ENGINE_PROMPTS
from tests.backend.models.test_llama_model import check_against_transformers
from tests.backend.models.test_tensor_parallel import TP_SIZE, _free_port, _logits, _rank_main

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_mixtral_dir(tiny_model_factory: Any) -> Path:
    return randomize_norms(tiny_model_factory("tiny-mixtral", TINY_MIXTRAL))


@pytest.fixture(scope="module")
def tiny_windowed_mixtral_dir(tiny_model_factory: Any) -> Path:
    """Mixtral with a sliding window shorter than the longer prompts."""
    settings = {**TINY_MIXTRAL, "sliding_window": 21}
    return randomize_norms(tiny_model_factory("tiny-mixtral-windowed", settings))


@pytest.fixture(scope="module")
def tiny_qwen3_moe_dir(tiny_model_factory: Any) -> Path:
    return randomize_norms(tiny_model_factory("tiny-qwen3-moe", TINY_QWEN3_MOE))


@pytest.fixture(scope="module")
def tiny_qwen3_moe_unnormalised_dir(tiny_model_factory: Any) -> Path:
    return randomize_norms(
        tiny_model_factory("tiny-qwen3-moe-unnormalised", TINY_QWEN3_MOE_UNNORMALISED)
    )


def _load(model_dir: Path, **kwargs: Any) -> LoadedModel:
    config = ModelConfig(model=str(model_dir), **kwargs)
    return load_model(config, CPU, torch.float32, TorchAttentionBackend())


def _prompt_logits(loaded: LoadedModel, prompts: list[list[int]]) -> list[torch.Tensor]:
    sequences = dict(enumerate(prompts))
    steps = [{s: (0, len(p)) for s, p in sequences.items()}]
    return [row for _, _, row in run_schedule(loaded.model, sequences, steps, 16, torch.float32, CPU)]


@pytest.mark.parametrize(
    "fixture,lengths",
    [
        ("tiny_mixtral_dir", [1, 4, 7, 250]),
        ("tiny_qwen3_moe_dir", [1, 4, 7, 250]),
        ("tiny_qwen3_moe_unnormalised_dir", [3, 60]),
        ("tiny_windowed_mixtral_dir", [7, 60]),
    ],
)
def test_logits_match_transformers(
    fixture: str, lengths: list[int], request: pytest.FixtureRequest
) -> None:
    """Every row of a paged schedule (whole prompts, a two-chunk prefill, decodes) within the
    fp32 tolerance of the Llama tests."""
    loaded = _load(request.getfixturevalue(fixture))
    picks = check_against_transformers(
        loaded,
        prompts=random_prompts(lengths, loaded.model.vocab_size, seed=5),
        chunked_len=45,
        first_chunk=18,
        decode_steps=4,
        block_size=4,
        seed=11,
    )
    assert len(set(picks)) > len(picks) // 2, "tiny model logits collapse onto few tokens"


def test_families_build_their_blocks(
    tiny_mixtral_dir: Path, tiny_qwen3_moe_dir: Path, tiny_qwen3_moe_unnormalised_dir: Path
) -> None:
    mixtral = _load(tiny_mixtral_dir).model
    assert isinstance(mixtral, MixtralForCausalLM)
    block = mixtral.model.layers[0].mlp
    assert isinstance(block, SparseMoEBlock)
    assert block.config.renormalize and not block.config.weights_in_model_dtype
    assert block.experts.w13.shape == (8, 2 * 64, 64) and block.experts.w2.shape == (8, 64, 64)

    qwen = _load(tiny_qwen3_moe_dir).model
    assert isinstance(qwen, Qwen3MoeForCausalLM)
    kinds = [type(layer.mlp) for layer in qwen.model.layers]
    assert kinds == [SparseMoEBlock, LlamaMLP, SparseMoEBlock]  # mlp_only_layers=[1]
    assert qwen.model.layers[0].mlp.config.renormalize
    unnormalised = _load(tiny_qwen3_moe_unnormalised_dir).model
    kinds = [type(layer.mlp) for layer in unnormalised.model.layers]
    assert kinds == [LlamaMLP, SparseMoEBlock, LlamaMLP]  # decoder_sparse_step=2
    assert not unnormalised.model.layers[1].mlp.config.renormalize


def test_routing_observer_sees_every_sparse_layer(tiny_qwen3_moe_dir: Path) -> None:
    loaded = _load(tiny_qwen3_moe_dir)
    seen: list[tuple[int, tuple[int, ...]]] = []
    assert observe_routing(loaded.model, lambda layer, ids: seen.append((layer, ids.shape))) == 2
    _prompt_logits(loaded, [[5, 6, 7]])
    assert seen == [(0, (3, 2)), (2, (3, 2))]
    observe_routing(loaded.model, None)
    _prompt_logits(loaded, [[5, 6, 7]])
    assert len(seen) == 2


def _restack(model_dir: Path, out: Path, block: str, gate: str, up: str, down: str) -> Path:
    """The checkpoint with every layer's experts stacked as transformers 5 holds them in
    memory (``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj``)."""
    shutil.copytree(model_dir, out)
    state = load_file(str(out / "model.safetensors"))
    layers = {name.split(".")[2] for name in state if f".{block}.experts." in name}
    for layer in layers:
        prefix = f"model.layers.{layer}.{block}.experts"
        count = len({n for n in state if n.startswith(prefix) and n.endswith(f".{down}.weight")})
        tensors = {
            (e, p): state.pop(f"{prefix}.{e}.{p}.weight")
            for e in range(count)
            for p in (gate, up, down)
        }
        gates = [torch.cat([tensors[e, gate], tensors[e, up]]) for e in range(count)]
        state[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(gates)
        state[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(
            [tensors[e, down] for e in range(count)]
        )
        router = f"model.layers.{layer}.{block}.gate.weight"
        state[f"model.layers.{layer}.mlp.gate.weight"] = state.pop(router)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize(
    "fixture,names",
    [
        ("tiny_mixtral_dir", ("block_sparse_moe", "w1", "w3", "w2")),
        ("tiny_qwen3_moe_dir", ("mlp", "gate_proj", "up_proj", "down_proj")),
    ],
)
def test_stacked_experts_load_like_per_expert_ones(
    fixture: str, names: tuple[str, str, str, str], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    model_dir = request.getfixturevalue(fixture)
    stacked = _restack(model_dir, tmp_path / "stacked", *names)
    prompts = random_prompts([9], 49152, seed=3)
    want = _prompt_logits(_load(model_dir), prompts)
    got = _prompt_logits(_load(stacked), prompts)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_bad_checkpoints_and_configs_are_refused(tiny_qwen3_moe_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    shutil.copytree(tiny_qwen3_moe_dir, missing)
    state = load_file(str(missing / "model.safetensors"))
    del state["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(state, str(missing / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"missing 1 tensors: model.layers.2.mlp.experts.w13:\(5, 1\)"):
        _load(missing)

    with pytest.raises(ModelLoadError, match="top-k 9 must be between 1 and the number of experts"):
        _load(tiny_qwen3_moe_dir, load_format="dummy", hf_overrides={"num_experts_per_tok": 9})



def test_two_rank_tensor_parallel_matches_single_rank(
    tiny_qwen3_moe_dir: Path, tmp_path: Path
) -> None:
    """Every expert's intermediate dimension split over two gloo ranks, one all-reduce per
    block: the logits equal the unsplit model's to fp32 reordering. (Mixtral's blocks are the
    same module; Qwen3-MoE adds a dense layer and per-head norms beside them.)"""
    model_dir = tiny_qwen3_moe_dir
    mp.spawn(_rank_main, args=(_free_port(), model_dir, tmp_path), nprocs=TP_SIZE, join=True)
    expected = _logits(model_dir, 0, 1)
    for rank in range(TP_SIZE):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * expected.abs().max().item())


# The engine: 8 prompts of 1 to 300 tokens together, a 64-token budget (chunked prefill) and
# 24 blocks (the longest request needs 20: preemption); greedy tokens equal transformers'.
@pytest.mark.parametrize("fixture", ["tiny_mixtral_dir", "tiny_qwen3_moe_dir"])
def test_engine_matches_transformers(fixture: str, request: pytest.FixtureRequest) -> None:
    run_and_compare(
        request.getfixturevalue(fixture), 20, num_blocks=24, budget=64,
        prompt_lengths=ENGINE_PROMPTS,
    )
