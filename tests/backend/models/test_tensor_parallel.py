"""Two CPU processes (gloo) run a tiny model split over tensor-parallel ranks; their logits
must equal the unsplit model's. This exercises the sharding weight loaders, the per-rank head
counts and the row-parallel all-reduce together, for Llama, Qwen3 (per-head norms on every
rank) and Phi-3 (fused checkpoint tensors cut per rank)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from pagedserve.backend.models.layer_context import LayerContext
from pagedserve.backend.models.registry import resolve_model_class
from pagedserve.backend.runner.attention import (
    AttentionMetadata,
    TorchAttentionBackend,
    forward_context,
)

CPU = torch.device("cpu")
TP_SIZE = 2
PROMPT = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47]


def _logits(model_dir: Path, tp_rank: int, tp_size: int) -> torch.Tensor:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    ctx = LayerContext(torch.float32, CPU, tp_rank=tp_rank, tp_size=tp_size)
    model = resolve_model_class(config)(config, TorchAttentionBackend(), ctx)
    model.load_weights(load_file(str(model_dir / "model.safetensors")).items())
    n = len(PROMPT)
    caches = [
        torch.zeros(2, 1, n, model.num_kv_heads, model.head_dim) for _ in range(model.num_layers)
    ]
    metadata = AttentionMetadata.single_prefill(n, block_size=n, device="cpu")
    with torch.no_grad():
        with forward_context(metadata, caches):
            hidden = model(torch.tensor(PROMPT), torch.arange(n))
        return model.compute_logits(hidden)


def _rank_main(rank: int, port: int, model_dir: Path, out_dir: Path) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=TP_SIZE
    )
    try:
        torch.save(_logits(model_dir, rank, TP_SIZE), out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen3_dir", "tiny_phi3_dir"])
def test_two_rank_tensor_parallel_matches_single_rank(
    fixture: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    model_dir = request.getfixturevalue(fixture)
    mp.spawn(_rank_main, args=(_free_port(), model_dir, tmp_path), nprocs=TP_SIZE, join=True)
    expected = _logits(model_dir, 0, 1)
    for rank in range(TP_SIZE):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        # Split GEMMs sum in a different order; fp32 keeps that far below 1e-4 relative.
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * expected.abs().max().item())
