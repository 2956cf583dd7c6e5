"""Prefill attention rate by key-tile size (the varlen kernel's ``block_n``):

    python tests/gpu/prefill_tiles_bench.py

Fresh causal prefills over a shuffled paged cache in bf16, 32 query / 8 KV heads, head dims 64
and 128, 4 x 2048 and 1 x 8192 tokens: TFLOP/s (causal pairs only) with 32-, 64- and 128-key
tiles. ``AttentionKernelConfig``'s tile defaults per head dim come from this table.
"""

from __future__ import annotations

import torch
import triton

from pagedserve.kernels.paged_attention import AttentionKernelConfig, paged_attention_triton

HEADS, KV_HEADS, BLOCK_SIZE = 32, 8, 16
TILES = (32, 64, 128)


def prefill_tflops(head_dim: int, num_seqs: int, seq_len: int, block_n: int) -> float:
    num_blocks = num_seqs * seq_len // BLOCK_SIZE
    cache = torch.randn(2, num_blocks, BLOCK_SIZE, KV_HEADS, head_dim, device="cuda", dtype=torch.bfloat16)
    tables = torch.randperm(num_blocks, device="cuda").int().view(num_seqs, seq_len // BLOCK_SIZE)
    q = torch.randn(num_seqs * seq_len, HEADS, head_dim, device="cuda", dtype=torch.bfloat16)
    query_start_loc = torch.arange(num_seqs + 1, device="cuda", dtype=torch.int32) * seq_len
    seq_lens = torch.full((num_seqs,), seq_len, device="cuda", dtype=torch.int32)
    config = AttentionKernelConfig(block_n=block_n, block_n_wide_heads=block_n)
    ms = triton.testing.do_bench(
        lambda: paged_attention_triton(
            q, cache, tables, query_start_loc, seq_lens, head_dim**-0.5, seq_len, seq_len, config=config
        ),
        warmup=5,
        rep=40,
    )
    flops = 4 * num_seqs * HEADS * head_dim * seq_len * seq_len / 2
    return flops / ms / 1e9


def main() -> None:
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}: prefill attention TFLOP/s by key tile")
    print(f"{'head dim':>8} {'shape':>8} " + " ".join(f"{f'block_n {n}':>12}" for n in TILES))
    for head_dim in (64, 128):
        for num_seqs, seq_len in ((4, 2048), (1, 8192)):
            rates = [prefill_tflops(head_dim, num_seqs, seq_len, n) for n in TILES]
            print(f"{head_dim:>8} {f'{num_seqs}x{seq_len}':>8} " + " ".join(f"{r:>12.0f}" for r in rates))


if __name__ == "__main__":
    main()
