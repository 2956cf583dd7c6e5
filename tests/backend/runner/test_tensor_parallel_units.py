"""The single-process pieces of tensor parallelism: the step message, the launch environment,
the config a worker receives, and the vocabulary split with its dummy weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pagedserve.backend.config import EngineConfig
from pagedserve.backend.models.layer_context import LayerContext
from pagedserve.backend.models.layers import LMHead, VocabEmbedding
from pagedserve.backend.models.loader import load_model
from pagedserve.backend.runner.attention import TorchAttentionBackend
from pagedserve.backend.runner.distributed import LaunchEnv, decode_config, encode_config
from pagedserve.backend.runner.batch import StepBatch

CPU = torch.device("cpu")


def _random_batch(rng: np.random.Generator, block_size: int) -> StepBatch:
    num_seqs = int(rng.integers(1, 6))
    query_lens = rng.integers(1, 40, num_seqs).astype(np.int32)
    seq_lens = (query_lens + rng.integers(0, 60, num_seqs)).astype(np.int32)
    max_blocks = int(-(-seq_lens.max() // block_size))
    tables = rng.permutation(200)[: num_seqs * max_blocks].reshape(num_seqs, max_blocks)
    num_tokens = int(query_lens.sum())
    return StepBatch(
        input_ids=rng.integers(0, 50_000, num_tokens).astype(np.int64),
        query_lens=query_lens,
        seq_lens=seq_lens,
        block_tables=tables.astype(np.int32),
        sample_rows=np.cumsum(query_lens)[rng.random(num_seqs) < 0.7].astype(np.int64) - 1,
        in_flight_rows=np.flatnonzero(rng.random(num_tokens) < 0.2).astype(np.int64),
    )


@pytest.mark.parametrize("seed", range(5))
def test_step_batch_positions_and_slots_match_a_per_sequence_loop(seed: int) -> None:
    block_size = 16
    batch = _random_batch(np.random.default_rng(seed), block_size)
    positions, slots = [], []
    for i, (q, s) in enumerate(zip(batch.query_lens, batch.seq_lens)):
        p = np.arange(s - q, s)
        positions.append(p)
        slots.append(batch.block_tables[i][p // block_size] * block_size + p % block_size)
    got = batch.positions()
    np.testing.assert_array_equal(got, np.concatenate(positions))
    np.testing.assert_array_equal(batch.slot_mapping(got, block_size), np.concatenate(slots))
    np.testing.assert_array_equal(batch.query_start_loc(), np.r_[0, np.cumsum(batch.query_lens)])


def test_step_batch_survives_the_wire() -> None:
    batch = _random_batch(np.random.default_rng(7), 8)
    header, payload = batch.header(), batch.payload()
    assert StepBatch.payload_len(header) == len(payload)
    back = StepBatch.unpack(header, payload.copy())
    assert len(batch.in_flight_rows) > 0  # the seed exercises every field
    for name in ("input_ids", "query_lens", "seq_lens", "block_tables", "sample_rows", "in_flight_rows"):
        sent, got = getattr(batch, name), getattr(back, name)
        assert got.dtype == sent.dtype and got.shape == sent.shape
        np.testing.assert_array_equal(got, sent)
    with pytest.raises(ValueError, match="header says"):
        StepBatch.unpack(header, payload[:-1])


def test_launch_env_is_all_or_nothing() -> None:
    full = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "WORLD_SIZE": "4", "RANK": "2"}
    assert LaunchEnv.from_environ({}) is None
    env = LaunchEnv.from_environ({**full, "LOCAL_RANK": "1"})
    assert env == LaunchEnv("10.0.0.1", 29500, 4, 2, 1)
    assert LaunchEnv.from_environ(full) == LaunchEnv("10.0.0.1", 29500, 4, 2, None)
    with pytest.raises(ValueError, match="RANK not set"):
        LaunchEnv.from_environ({k: v for k, v in full.items() if k != "RANK"})
    with pytest.raises(ValueError, match="invalid"):
        LaunchEnv.from_environ({**full, "WORLD_SIZE": "two"})


def test_workers_receive_the_whole_config_as_plain_data() -> None:
    config = EngineConfig.from_kwargs(
        model="/models/x", dtype="float32", num_blocks=12, max_num_seqs=3,
        tensor_parallel_size=2, distributed_timeout_s=5.0, enable_cuda_graphs=False,
        hf_overrides={"vocab_size": 7, "rope_scaling": {"factor": 8.0}},
    )
    data = encode_config(config)
    assert data.startswith(b"{")  # JSON, never a pickle
    assert decode_config(data) == config


@pytest.mark.parametrize(("vocab", "tp"), [(50, 1), (50, 2), (50, 4), (49, 4)])
def test_vocab_split_covers_every_row_once_with_zero_padding(vocab: int, tp: int) -> None:
    full = torch.randn(vocab, 8)
    shards = []
    for rank in range(tp):
        ctx = LayerContext(torch.float32, CPU, tp_rank=rank, tp_size=tp)
        embed = VocabEmbedding(vocab, 8, ctx)
        embed.weight_loader(embed.weight, full)
        head = LMHead(vocab, 8, ctx, tied_embedding=embed)
        assert head.weight is embed.weight
        assert embed.weight.shape[0] == -(-vocab // tp)
        shards.append(embed.weight)
    stacked = torch.cat(shards)
    assert torch.equal(stacked[:vocab], full)
    assert torch.count_nonzero(stacked[vocab:]) == 0


def test_dummy_weights_do_not_depend_on_the_split(tiny_llama_dir: Path) -> None:
    """Each rank's dummy shard is a slice of the unsplit model's dummy weights."""
    config = EngineConfig.from_kwargs(model=str(tiny_llama_dir), load_format="dummy", seed=3)

    def model(rank: int, tp: int) -> torch.nn.Module:
        loaded = load_model(config.model, CPU, torch.float32, TorchAttentionBackend(), rank, tp)
        return loaded.model

    def layer(m: torch.nn.Module) -> torch.nn.Module:
        return m.model.layers[1]

    full, ranks = model(0, 1), [model(r, 2) for r in range(2)]
    assert torch.equal(
        torch.cat([r.model.embed_tokens.weight for r in ranks]), full.model.embed_tokens.weight
    )
    assert torch.equal(
        torch.cat([layer(r).self_attn.o_proj.weight for r in ranks], dim=1),
        layer(full).self_attn.o_proj.weight,
    )
    gate_up = [layer(r).mlp.gate_up_proj.weight.chunk(2) for r in ranks]
    full_gate, full_up = layer(full).mlp.gate_up_proj.weight.chunk(2)
    assert torch.equal(torch.cat([g for g, _ in gate_up]), full_gate)
    assert torch.equal(torch.cat([u for _, u in gate_up]), full_up)
    assert torch.equal(ranks[1].model.norm.weight, full.model.norm.weight)
