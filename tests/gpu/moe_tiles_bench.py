"""Fused MoE rate by tile configuration, at Qwen3-30B-A3B's expert shapes:

    python tests/gpu/moe_tiles_bench.py [--out FILE.json]

128 experts, top-8, hidden 2048, expert intermediate 768, bf16, uniform random routing (what a
random-weight router gives), for token counts from one decode request to a 16,384-token prefill
step. For each count, every candidate tile configuration runs the whole ``fused_moe_triton``
(alignment, both grouped GEMMs, the top-k sum) replayed from a CUDA graph; the table gives the
best configuration, the current choice (``choose_tile_config``) and each one's fraction of the
step's bound: the larger of the hit experts' weight bytes at the measured copy bandwidth and the
routed FLOPs at the measured bf16 matmul rate. ``TILE_CONFIGS`` in ``kernels/fused_moe.py`` comes from this table.
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import triton

from pagedserve.kernels.fused_moe import MoETileConfig, choose_tile_config, fused_moe_triton

EXPERTS, TOP_K, HIDDEN, INTER = 128, 8, 2048, 768
TOKEN_COUNTS = (1, 64, 256, 512, 2048, 16384)
DTYPE = torch.bfloat16


def candidates() -> list[MoETileConfig]:
    """Row, column and reduction tiles, warps and pipeline stages; grouped row blocks (L2 reuse
    of weight tiles) except for the smallest rows, which try both orders."""
    return [
        MoETileConfig(block_m=m, block_n=n, block_k=k, group_m=g, num_warps=w, num_stages=s)
        for m, n, k, w, s in itertools.product((16, 32, 64, 128), (64, 128, 256), (64, 128), (4, 8), (3, 4))
        for g in ((1, 8) if m == 16 else (8,))
        # Shared memory per stage: an activation tile and (gate + up) weight tiles.
        if (m * k + 2 * n * k) * 2 * s <= 200 * 1024
    ]


def ceilings() -> tuple[float, float]:
    """(copy bandwidth bytes/s, bf16 matmul FLOP/s), measured here."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=5, rep=50)
    bandwidth = 2 * src.numel() / (ms * 1e-3)
    a = torch.randn(8192, 8192, dtype=DTYPE, device="cuda")
    b = torch.randn(8192, 8192, dtype=DTYPE, device="cuda")
    ms = triton.testing.do_bench(lambda: a @ b, warmup=5, rep=50)
    return bandwidth, 2 * 8192**3 / (ms * 1e-3)


def graph_seconds(fn: Callable[[], object], calls: int = 10) -> float:
    """Device time of one call, replayed from a CUDA graph as decode steps run it: launching
    a dozen small kernels from Python takes longer than a small batch's kernels run."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return triton.testing.do_bench(graph.replay, warmup=3, rep=30) * 1e-3 / calls


def routing(num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.rand(num_tokens, EXPERTS, device="cuda").topk(TOP_K, dim=-1).indices.int()
    weights = torch.softmax(torch.randn(num_tokens, TOP_K, device="cuda"), dim=-1).to(DTYPE)
    return weights, ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    bandwidth, flops_rate = ceilings()
    print(f"{torch.cuda.get_device_name()}: copy {bandwidth / 1e9:.0f} GB/s, "
          f"bf16 matmul {flops_rate / 1e12:.0f} TFLOP/s")
    w13 = torch.randn(EXPERTS, 2 * INTER, HIDDEN, dtype=DTYPE, device="cuda") * 0.02
    w2 = torch.randn(EXPERTS, HIDDEN, INTER, dtype=DTYPE, device="cuda") * 0.02
    per_expert_bytes = (w13[0].numel() + w2[0].numel()) * 2
    configs = candidates()
    print(f"{len(configs)} candidate tile configurations")
    rows = []
    header = f"{'tokens':>6} {'per expert':>10} {'bound us':>9} {'best us':>8} {'best %':>6} " \
             f"{'current us':>10} {'current %':>9}  best tiles"
    print(header)
    for num_tokens in TOKEN_COUNTS:
        x = torch.randn(num_tokens, HIDDEN, dtype=DTYPE, device="cuda")
        weights, ids = routing(num_tokens)
        hit = torch.unique(ids).numel()
        n = num_tokens * TOP_K
        bound = max(hit * per_expert_bytes / bandwidth, 2 * n * 3 * HIDDEN * INTER / flops_rate)
        reference = fused_moe_triton(x, w13, w2, weights, ids, config=choose_tile_config(n, EXPERTS))
        timings: list[tuple[float, MoETileConfig]] = []
        for config in configs:
            try:
                out = fused_moe_triton(x, w13, w2, weights, ids, config=config)
            except Exception:  # out of shared memory or registers for this tile
                continue
            # Same sums in another order: bf16 rounding of the per-expert outputs only.
            assert torch.allclose(out.float(), reference.float(), atol=2e-2, rtol=2e-2), config
            timings.append((graph_seconds(lambda config=config: fused_moe_triton(
                x, w13, w2, weights, ids, config=config)), config))
        best_s, best = min(timings, key=lambda t: t[0])
        current = choose_tile_config(n, EXPERTS)
        current_s = graph_seconds(lambda: fused_moe_triton(x, w13, w2, weights, ids, config=current))
        mean = n / EXPERTS
        print(f"{num_tokens:>6} {mean:>10.1f} {bound * 1e6:>9.0f} {best_s * 1e6:>8.0f} "
              f"{100 * bound / best_s:>6.1f} {current_s * 1e6:>10.0f} {100 * bound / current_s:>9.1f}  "
              f"{best}")
        top = sorted(timings, key=lambda t: t[0])[:5]
        rows.append({
            "tokens": num_tokens, "assignments_per_expert": mean, "experts_hit": hit,
            "bound_s": bound, "best_s": best_s, "current_s": current_s,
            "best": asdict(best), "top5": [{"s": s, **asdict(c)} for s, c in top],
        })
    if args.out:
        args.out.write_text(json.dumps({"copy_bandwidth": bandwidth, "bf16_flops": flops_rate,
                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
