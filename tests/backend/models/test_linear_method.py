"""The linear-method seam: every linear layer creates its weight and multiplies through the
LayerContext's method, and the loader runs the method's after-loading hook on each of them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import cast

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig

from pagedserve.backend.config import ModelConfig
from pagedserve.backend.models.layer_context import LayerContext
from pagedserve.backend.models.layers import ShardedLinear
from pagedserve.backend.models.llama import LlamaForCausalLM
from pagedserve.backend.models.loader import load_model
from pagedserve.backend.quantization.unquantized import UnquantizedLinearMethod
from pagedserve.backend.runner.attention import (
    AttentionMetadata,
    TorchAttentionBackend,
    forward_context,
)

CPU = torch.device("cpu")
F32 = torch.float32
PROMPT = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47]
# Power of two: scaling a GEMM's result by it is exact in floating point, so "output times
# FACTOR" and "weight and bias times FACTOR" agree to the last bit.
FACTOR = 2.0


class ScaledOutputMethod:
    """The unquantized method with every output times FACTOR: a wrapper shaped as LoRA's
    will be (the base method's result plus something), recording the layers it serves."""

    def __init__(self) -> None:
        self.base = UnquantizedLinearMethod()
        self.created: list[nn.Module] = []

    def create_weights(
        self, layer: nn.Module, input_size: int, output_sizes: Sequence[int], ctx: LayerContext
    ) -> None:
        self.created.append(layer)
        self.base.create_weights(layer, input_size, output_sizes, ctx)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        self.base.process_weights_after_loading(layer)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return FACTOR * self.base.apply(layer, x, bias)


def _checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(str(path)))
    return weights


def _logits(model: LlamaForCausalLM) -> torch.Tensor:
    n = len(PROMPT)
    caches = [
        torch.zeros(2, 1, n, model.num_kv_heads, model.head_dim) for _ in range(model.num_layers)
    ]
    metadata = AttentionMetadata.single_prefill(n, block_size=n, device="cpu")
    with torch.no_grad(), forward_context(metadata, caches):
        return model.compute_logits(model(torch.tensor(PROMPT), torch.arange(n)))


def test_a_custom_method_serves_every_linear_layer(tiny_qwen2_dir: Path) -> None:
    """Qwen2 has biases on q/k/v: the scaled model must equal the plain model whose q/k/v, o,
    gate/up and down weights and biases are scaled instead (not the embedding, the norms or
    the untied LM head, which are no linear method's). One layer that skipped the method
    would compute its unscaled product and move every logit after it."""
    config = AutoConfig.from_pretrained(tiny_qwen2_dir, local_files_only=True)
    weights = _checkpoint(tiny_qwen2_dir)
    method = ScaledOutputMethod()
    ctx = LayerContext(F32, CPU, linear_method=method)
    scaled = LlamaForCausalLM(config, TorchAttentionBackend(), ctx)
    scaled.load_weights(weights.items())
    assert {id(m) for m in method.created} == {
        id(m) for m in scaled.modules() if isinstance(m, ShardedLinear)
    }

    def plain(edit: bool) -> LlamaForCausalLM:
        model = LlamaForCausalLM(config, TorchAttentionBackend(), LayerContext(F32, CPU))
        model.load_weights(
            (name, FACTOR * t if edit and "_proj." in name else t) for name, t in weights.items()
        )
        return model

    assert any(name.endswith("q_proj.bias") for name in weights)
    got = _logits(scaled)
    assert not torch.allclose(got, _logits(plain(edit=False)))  # the scaling reaches the logits
    assert torch.equal(got, _logits(plain(edit=True)))


def test_loader_processes_every_linear_layer_after_its_weights_are_in(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    processed: list[tuple[nn.Module, torch.Tensor]] = []

    def record(self: UnquantizedLinearMethod, layer: nn.Module) -> None:
        processed.append((layer, cast(torch.Tensor, layer.weight).detach().clone()))

    monkeypatch.setattr(UnquantizedLinearMethod, "process_weights_after_loading", record)
    model = load_model(
        ModelConfig(model=str(tiny_llama_dir)), CPU, F32, TorchAttentionBackend()
    ).model
    linears = [m for m in model.modules() if isinstance(m, ShardedLinear)]
    assert [id(layer) for layer, _ in processed] == [id(m) for m in linears]  # once each
    checkpoint = _checkpoint(tiny_llama_dir)
    o_proj = model.model.layers[0].self_attn.o_proj
    (seen,) = [weight for layer, weight in processed if layer is o_proj]
    assert torch.equal(seen, checkpoint["model.layers.0.self_attn.o_proj.weight"])
