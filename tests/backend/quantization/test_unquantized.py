"""The unquantized linear method's GEMM on CPU: oneDNN with packed weights against
``F.linear``, and packed copies that follow weight reloads through the layers."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from pagedserve.backend.models.layer_context import LayerContext
from pagedserve.backend.models.layers import (
    ColumnParallelLinear,
    LMHead,
    RowParallelLinear,
    VocabEmbedding,
)
from pagedserve.backend.quantization import unquantized
from pagedserve.backend.quantization.unquantized import linear

CPU = torch.device("cpu")
F32 = torch.float32
CTX = LayerContext(F32, CPU)
# fp32 on both sides; only the order of the K-long sums differs. Relative to max |output|
# (measured worst: 1.4e-6; a reduced-precision GEMM would be off by ~1e-3).
REL_TOL = 5e-6

pytestmark = pytest.mark.skipif(
    not unquantized._HAS_ONEDNN_LINEAR, reason="this torch build has no oneDNN linear"
)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    scale = ref.abs().max().item()
    diff = (out - ref).abs().max().item()
    assert diff <= REL_TOL * scale, f"max |diff| {diff:.2e} > {REL_TOL} * {scale:.2f}"


# The default model's projections (qkv, o, gate/up, down) and a small LM head, at decode and
# prefill row counts, plus odd sizes.
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576), (576, 4099), (37, 5)]


@pytest.mark.parametrize("rows", [1, 7, 32, 300])
@pytest.mark.parametrize("in_features,out_features", SHAPES)
def test_matches_f_linear(
    rows: int, in_features: int, out_features: int, gen: torch.Generator
) -> None:
    weight = torch.randn(out_features, in_features, generator=gen) * in_features**-0.5
    bias = torch.randn(out_features, generator=gen)
    x = torch.randn(rows, in_features, generator=gen)
    with torch.inference_mode():
        assert_close(linear(x, weight, None), F.linear(x, weight))
        assert_close(linear(x, weight, bias), F.linear(x, weight, bias))
        # Strided and batched inputs, as views of other tensors reach the layers.
        wide = torch.randn(rows, in_features + 3, generator=gen)[:, :in_features]
        assert_close(linear(wide, weight, bias), F.linear(wide, weight, bias))
        x3 = x.view(1, rows, in_features)
        assert_close(linear(x3, weight, bias), F.linear(x3, weight, bias))


def test_empty_batch_and_other_dtypes_and_autograd(gen: torch.Generator) -> None:
    weight = torch.randn(16, 8, generator=gen)
    with torch.inference_mode():
        assert linear(torch.empty(0, 8), weight, None).shape == (0, 16)
    x16 = torch.randn(3, 8, generator=gen).bfloat16()
    assert torch.equal(linear(x16, weight.bfloat16(), None), F.linear(x16, weight.bfloat16()))
    # Inputs that need gradients keep autograd's own GEMM.
    x = torch.randn(3, 8, generator=gen, requires_grad=True)
    linear(x, weight, None).sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, weight.sum(0).expand(3, 8))


def test_reloaded_weights_are_never_served_stale(gen: torch.Generator) -> None:
    x = torch.randn(4, 8, generator=gen)
    column = ColumnParallelLinear(8, 16, False, CTX)
    row = RowParallelLinear(8, 6, False, CTX)
    for _ in range(2):  # the second round reloads layers that have already run
        w_col = torch.randn(16, 8, generator=gen)
        w_row = torch.randn(6, 8, generator=gen)
        column.weight_loader(column.weight, w_col)
        row.weight_loader(row.weight, w_row)
        with torch.inference_mode():
            assert_close(column(x), F.linear(x, w_col))
            assert_close(row(x), F.linear(x, w_row))


def test_tied_head_follows_embedding_reload(gen: torch.Generator) -> None:
    ctx = LayerContext(F32, CPU)
    embed = VocabEmbedding(50, 8, ctx)
    head = LMHead(50, 8, ctx, tied_embedding=embed)
    hidden = torch.randn(3, 8, generator=gen)
    for _ in range(2):
        table = torch.randn(50, 8, generator=gen)
        embed.weight_loader(embed.weight, table)
        with torch.inference_mode():
            assert_close(head(hidden), F.linear(hidden, table))


def test_packed_copies_die_with_their_layers(gen: torch.Generator) -> None:
    packed = unquantized._onednn_weights._packed
    before = len(packed)
    layer = ColumnParallelLinear(8, 16, False, CTX)
    layer.weight_loader(layer.weight, torch.randn(16, 8, generator=gen))
    with torch.inference_mode():
        layer(torch.randn(2, 8, generator=gen))
    assert len(packed) == before + 1
    del layer
    gc.collect()
    assert len(packed) == before
