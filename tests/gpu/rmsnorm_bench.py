"""GPU time of one fused residual-add + RMSNorm launch, beside the torch ops transformers runs:

    python tests/gpu/rmsnorm_bench.py

bf16, hidden 576-8192, 1 to 16,384 rows; microseconds per launch from CUDA-graph replays of 50
launches (a plain timing loop would measure the host's launch cost at the small shapes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pagedserve.kernels.rmsnorm import fused_add_rms_norm_ref, fused_add_rms_norm_triton

LAUNCHES = 50


def graph_us(fn: Callable[[], object]) -> float:
    """Best of five replays of a graph of ``LAUNCHES`` calls, in µs per call."""
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        fn()  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(LAUNCHES):
            fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / LAUNCHES)
    return min(times)


def main() -> None:
    print(f"{'hidden':>6} {'rows':>6} {'pagedserve us':>14} {'torch ops us':>13}")
    for hidden in (576, 2048, 4096, 8192):
        for rows in (1, 64, 256, 1024, 16384):
            x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
            residual = torch.randn_like(x)
            weight = torch.ones(hidden, device="cuda", dtype=torch.bfloat16)
            ours = graph_us(lambda: fused_add_rms_norm_triton(x, residual, weight, 1e-5))
            theirs = graph_us(lambda: fused_add_rms_norm_ref(x, residual, weight, 1e-5))
            print(f"{hidden:>6} {rows:>6} {ours:>14.1f} {theirs:>13.1f}", flush=True)


if __name__ == "__main__":
    main()
