"""The forward context: the model's attention layers read the step's metadata and KV caches
from it, it exists only inside ``forward_context``, and concurrent forwards on two threads
each see their own."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from pagedserve.backend.config import ModelConfig
from pagedserve.backend.models.interface import CausalLM
from pagedserve.backend.models.loader import load_model
from pagedserve.backend.runner.attention import (
    AttentionMetadata,
    ForwardContext,
    TorchAttentionBackend,
    forward_context,
    get_forward_context,
)

CPU = torch.device("cpu")
# Generous: the two forwards of tiny models reach the barrier within seconds of each other.
BARRIER_TIMEOUT_S = 120.0


def _step(model: CausalLM, n: int) -> tuple[AttentionMetadata, list[torch.Tensor]]:
    """One prefill of n tokens into a single-block cache per layer."""
    caches = [
        torch.zeros(2, 1, n, model.num_kv_heads, model.head_dim) for _ in range(model.num_layers)
    ]
    return AttentionMetadata.single_prefill(n, block_size=n, device="cpu"), caches


def _load(model_dir: Path) -> CausalLM:
    config = ModelConfig(model=str(model_dir))
    return load_model(config, CPU, torch.float32, TorchAttentionBackend()).model


def test_context_exists_only_inside_a_step() -> None:
    with pytest.raises(RuntimeError, match="no forward context"):
        get_forward_context()
    outer_meta = AttentionMetadata.single_prefill(3, block_size=4, device="cpu")
    inner_meta = AttentionMetadata.single_prefill(5, block_size=4, device="cpu")
    outer_caches, inner_caches = [torch.zeros(1)], [torch.zeros(1)]
    with forward_context(outer_meta, outer_caches) as outer:
        assert outer == ForwardContext(outer_meta, outer_caches)
        assert get_forward_context() is outer
        with forward_context(inner_meta, inner_caches) as inner:
            assert get_forward_context() is inner
            assert inner.metadata is inner_meta and inner.kv_caches is inner_caches
        assert get_forward_context() is outer  # the inner step ended, the outer one goes on
    with pytest.raises(RuntimeError, match="no forward context"):
        get_forward_context()


def test_model_outside_a_step_says_what_is_missing(tiny_llama_dir: Path) -> None:
    model = _load(tiny_llama_dir)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"forward_context\(metadata"):
        model(torch.tensor([1, 2, 3]), torch.arange(3))


def test_forwards_on_two_threads_each_see_their_own_context(
    tiny_llama_dir: Path, tiny_qwen2_dir: Path
) -> None:
    """Two models (2 and 3 layers) run one prompt each (7 and 11 tokens) on two threads, both
    held mid-forward after their first decoder layer until the other got there too. A context
    shared by the threads would hand the later step's metadata and caches to the earlier
    one's remaining layers."""
    models = {"llama": _load(tiny_llama_dir), "qwen2": _load(tiny_qwen2_dir)}
    lengths = {"llama": 7, "qwen2": 11}
    generator = torch.Generator().manual_seed(0)
    prompts = {
        name: torch.randint(0, models[name].vocab_size, (n,), generator=generator)
        for name, n in lengths.items()
    }

    def run(name: str) -> torch.Tensor:
        model, n = models[name], lengths[name]
        metadata, caches = _step(model, n)
        with torch.no_grad(), forward_context(metadata, caches) as mine:
            hidden = model(prompts[name], torch.arange(n))
            assert get_forward_context() is mine
            return model.compute_logits(hidden)

    alone = {name: run(name) for name in models}

    barrier = threading.Barrier(len(models), timeout=BARRIER_TIMEOUT_S)
    seen: dict[str, ForwardContext] = {}

    def meet_after_first_layer(name: str) -> None:
        def hook(*_: object) -> None:
            barrier.wait()
            seen[name] = get_forward_context()

        models[name].model.layers[0].register_forward_hook(hook)

    def run_together(name: str) -> torch.Tensor:
        try:
            return run(name)
        except BaseException:
            barrier.abort()  # the other thread must not wait for one that failed
            raise

    for name in models:
        meet_after_first_layer(name)
    with ThreadPoolExecutor(max_workers=len(models)) as pool:
        futures = {name: pool.submit(run_together, name) for name in models}
        together = {name: future.result() for name, future in futures.items()}

    for name, model in models.items():
        assert seen[name].metadata.seq_lens_cpu == [lengths[name]]
        assert len(seen[name].kv_caches) == model.num_layers
        # Same model, same inputs: only a GEMM's thread split could move the last bits.
        scale = alone[name].abs().max().item()
        torch.testing.assert_close(together[name], alone[name], rtol=0, atol=1e-5 * scale)
