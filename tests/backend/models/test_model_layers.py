"""Layer-level checks: tensor-parallel weight slicing, norms and RoPE against transformers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

from pagedserve.backend.models.layer_context import LayerContext
from pagedserve.backend.models.layers import (
    ColumnParallelLinear,
    LMHead,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabEmbedding,
    rope_parameters,
)

CPU = torch.device("cpu")
F32 = torch.float32
CTX = LayerContext(F32, CPU)
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _split(rank: int, tp_size: int) -> LayerContext:
    return LayerContext(F32, CPU, tp_rank=rank, tp_size=tp_size)


def _load(layer: torch.nn.Module, name: str, tensor: torch.Tensor, shard_id: object = None) -> None:
    layer.weight_loader(getattr(layer, name), tensor, shard_id)


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_column_parallel_ranks_concatenate_to_full(tp_size: int, gen: torch.Generator) -> None:
    w = torch.randn(16, 8, generator=gen)
    b = torch.randn(16, generator=gen)
    x = torch.randn(5, 8, generator=gen)
    outs = []
    for rank in range(tp_size):
        layer = ColumnParallelLinear(8, 16, True, _split(rank, tp_size))
        _load(layer, "weight", w)
        _load(layer, "bias", b)
        outs.append(layer(x))
    torch.testing.assert_close(torch.cat(outs, dim=-1), x @ w.T + b)


@pytest.mark.parametrize("tp_size", [1, 2])
def test_merged_column_parallel_places_gate_and_up(tp_size: int, gen: torch.Generator) -> None:
    gate = torch.randn(12, 8, generator=gen)
    up = torch.randn(12, 8, generator=gen)
    x = torch.randn(3, 8, generator=gen)
    local = 12 // tp_size
    for rank in range(tp_size):
        layer = MergedColumnParallelLinear(8, [12, 12], False, _split(rank, tp_size))
        _load(layer, "weight", up, 1)  # load order must not matter
        _load(layer, "weight", gate, 0)
        out = layer(x)
        rows = slice(rank * local, (rank + 1) * local)
        torch.testing.assert_close(out[:, :local], x @ gate[rows].T)
        torch.testing.assert_close(out[:, local:], x @ up[rows].T)


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_qkv_parallel_splits_or_replicates_kv_heads(tp_size: int, gen: torch.Generator) -> None:
    """8 query heads over 2 KV heads: at TP 4 each KV head is replicated on two ranks."""
    hidden, head_dim, heads, kv_heads = 16, 4, 8, 2
    wq = torch.randn(heads * head_dim, hidden, generator=gen)
    wk = torch.randn(kv_heads * head_dim, hidden, generator=gen)
    wv = torch.randn(kv_heads * head_dim, hidden, generator=gen)
    bq, bk, bv = (torch.randn(w.shape[0], generator=gen) for w in (wq, wk, wv))
    x = torch.randn(3, hidden, generator=gen)
    full_q = (x @ wq.T + bq).view(3, heads, head_dim)
    full_k = (x @ wk.T + bk).view(3, kv_heads, head_dim)
    full_v = (x @ wv.T + bv).view(3, kv_heads, head_dim)
    for rank in range(tp_size):
        layer = QKVParallelLinear(hidden, head_dim, heads, kv_heads, True, _split(rank, tp_size))
        for shard, w, b in (("v", wv, bv), ("q", wq, bq), ("k", wk, bk)):
            _load(layer, "weight", w, shard)
            _load(layer, "bias", b, shard)
        q, k, v = layer.split(layer(x))
        q_per_rank = heads // tp_size
        kv_head = rank * kv_heads // tp_size  # the KV head this rank's query heads read
        kv_per_rank = max(1, kv_heads // tp_size)
        torch.testing.assert_close(q, full_q[:, rank * q_per_rank : (rank + 1) * q_per_rank])
        torch.testing.assert_close(k, full_k[:, kv_head : kv_head + kv_per_rank])
        torch.testing.assert_close(v, full_v[:, kv_head : kv_head + kv_per_rank])
        # The query heads of this rank map onto the KV heads it holds (GQA grouping).
        group = heads // kv_heads
        first_q = rank * q_per_rank
        assert first_q // group == kv_head


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_row_parallel_partial_sums_add_to_full(tp_size: int, gen: torch.Generator) -> None:
    w = torch.randn(6, 16, generator=gen)
    b = torch.randn(6, generator=gen)
    x = torch.randn(4, 16, generator=gen)
    local = 16 // tp_size
    total = torch.zeros(4, 6)
    for rank in range(tp_size):
        layer = RowParallelLinear(16, 6, True, _split(rank, tp_size), reduce_results=False)
        _load(layer, "weight", w)
        _load(layer, "bias", b)
        total += layer(x[:, rank * local : (rank + 1) * local])
    torch.testing.assert_close(total, x @ w.T + b)  # the bias is counted once


def test_weight_loaders_reject_bad_input(gen: torch.Generator) -> None:
    col = ColumnParallelLinear(8, 16, False, CTX)
    with pytest.raises(ValueError, match="shape mismatch"):
        _load(col, "weight", torch.randn(16, 9, generator=gen))
    with pytest.raises(ValueError, match="shard id"):
        _load(col, "weight", torch.randn(16, 8, generator=gen), "q")
    qkv = QKVParallelLinear(16, 4, 4, 2, False, CTX)
    with pytest.raises(ValueError, match="'q', 'k' or 'v'"):
        _load(qkv, "weight", torch.randn(16, 16, generator=gen), "x")
    with pytest.raises(ValueError, match="shape mismatch"):
        _load(qkv, "weight", torch.randn(16, 15, generator=gen), "q")
    # Too many rows would slice cleanly; the loader must still refuse them.
    for shard, rows in (("q", 20), ("k", 12), ("v", 4)):
        with pytest.raises(ValueError, match="shape mismatch"):
            _load(qkv, "weight", torch.randn(rows, 16, generator=gen), shard)
    sharded_col = ColumnParallelLinear(8, 16, False, _split(1, 2))
    with pytest.raises(ValueError, match="shape mismatch"):
        _load(sharded_col, "weight", torch.randn(24, 8, generator=gen))
    row = RowParallelLinear(16, 6, False, _split(0, 2))
    with pytest.raises(ValueError, match="shape mismatch"):
        _load(row, "weight", torch.randn(6, 24, generator=gen))
    merged = MergedColumnParallelLinear(8, [12, 12], False, CTX)
    with pytest.raises(ValueError, match="shard id"):
        _load(merged, "weight", torch.randn(12, 8, generator=gen), 2)
    with pytest.raises(ValueError, match="shape mismatch"):
        _load(merged, "weight", torch.randn(16, 8, generator=gen), 1)
    with pytest.raises(ValueError, match="not divisible"):
        ColumnParallelLinear(8, 15, False, _split(0, 2))
    with pytest.raises(ValueError, match="not a multiple"):
        QKVParallelLinear(16, 4, 12, 2, False, _split(0, 3))
    with pytest.raises(ValueError, match="invalid tensor-parallel rank"):
        LayerContext(F32, CPU, tp_rank=2, tp_size=2)
    with pytest.raises(ValueError, match="invalid tensor-parallel rank"):
        LayerContext(F32, CPU, tp_rank=0, tp_size=0)


def test_rms_norm_matches_transformers_with_and_without_residual(gen: torch.Generator) -> None:
    x = torch.randn(5, 32, generator=gen)
    residual = torch.randn(5, 32, generator=gen)
    weight = torch.randn(32, generator=gen)
    ours = RMSNorm(32, 1e-6, CTX)
    _load(ours, "weight", weight)
    ref = LlamaRMSNorm(32, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(weight)
        normed, passthrough = ours(x)
        assert torch.equal(normed, ref(x))
        assert passthrough is x
        normed, summed = ours(x, residual)
        assert torch.equal(summed, x + residual)
        assert torch.equal(normed, ref(x + residual))


def test_tied_lm_head_shares_the_embedding(gen: torch.Generator) -> None:
    ctx = LayerContext(F32, CPU)
    embed = VocabEmbedding(50, 8, ctx)
    head = LMHead(50, 8, ctx, tied_embedding=embed)
    _load(embed, "weight", torch.randn(50, 8, generator=gen))
    assert head.weight is embed.weight
    hidden = torch.randn(3, 8, generator=gen)
    logits = head(hidden)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, hidden @ embed.weight.T)
    untied = LMHead(50, 8, ctx)
    assert untied.weight is not embed.weight


def _old_style(config: LlamaConfig, scaling: dict | None) -> SimpleNamespace:
    """The same settings as transformers 4 configs spelled them."""
    return SimpleNamespace(
        rope_theta=config.rope_parameters["rope_theta"],
        rope_scaling=scaling,
        max_position_embeddings=config.max_position_embeddings,
    )


@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING], ids=["default", "llama3"])
def test_rotary_matches_transformers(scaling: dict | None, gen: torch.Generator) -> None:
    head_dim, max_pos = 32, 1024
    config = LlamaConfig(
        hidden_size=128,
        num_attention_heads=4,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rope_theta=500000.0,
        rope_scaling=dict(scaling) if scaling else None,
    )
    params = rope_parameters(config)
    assert params == rope_parameters(_old_style(config, dict(scaling) if scaling else None))
    rotary = RotaryEmbedding(head_dim, max_pos, params, CTX)

    positions = torch.randint(0, max_pos, (64,), generator=gen)
    q = torch.randn(64, 4, head_dim, generator=gen)
    k = torch.randn(64, 2, head_dim, generator=gen)
    q_rot, k_rot = rotary(positions, q, k)

    hf = LlamaRotaryEmbedding(config)
    cos, sin = hf(q, positions[None])  # [1, T, head_dim]
    cos, sin = cos[0, :, None], sin[0, :, None]

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([-x[..., head_dim // 2 :], x[..., : head_dim // 2]], dim=-1)

    torch.testing.assert_close(q_rot, q * cos + rotate_half(q) * sin, rtol=0, atol=0)
    torch.testing.assert_close(k_rot, k * cos + rotate_half(k) * sin, rtol=0, atol=0)


def test_unsupported_rope_settings_are_refused() -> None:
    with pytest.raises(NotImplementedError, match="yarn"):
        RotaryEmbedding(16, 64, {"rope_theta": 1e4, "rope_type": "yarn", "factor": 2.0}, CTX)
    with pytest.raises(NotImplementedError, match="partial"):
        RotaryEmbedding(16, 64, {"rope_theta": 1e4, "partial_rotary_factor": 0.5}, CTX)
