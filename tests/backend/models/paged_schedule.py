"""Drives a model through a hand-built paged schedule and compares it with transformers.

The schedule mixes what a continuous-batching step holds: a batched prefill of ragged prompts
plus the first chunk of a chunked prefill, then the second chunk beside decode tokens, then
pure decode steps. Blocks are handed out in shuffled order and the cache starts full of
garbage, so a wrong slot or block lookup shows in the logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from pagedserve.backend.models.llama import LlamaForCausalLM
from pagedserve.backend.runner.attention import AttentionMetadata, forward_context

Step = dict[int, tuple[int, int]]  # sequence -> token range [start, end) fed this step
Row = tuple[int, int, torch.Tensor]  # (sequence, position, fp32 logits)


@dataclass
class PagedCache:
    """Per-layer KV caches and a block allocator that hands out blocks in shuffled order, so
    a sequence's blocks are neither contiguous nor ascending."""

    kv_caches: list[torch.Tensor]
    block_size: int
    free_blocks: list[int]
    block_tables: dict[int, list[int]] = field(default_factory=dict)
    lengths: dict[int, int] = field(default_factory=dict)

    @classmethod
    def create(
        cls,
        model: LlamaForCausalLM,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        seed: int,
    ) -> PagedCache:
        generator = torch.Generator().manual_seed(seed)
        shape = (2, num_blocks, block_size, model.num_kv_heads, model.head_dim)
        # Garbage, not zeros: reading a slot that was never written must change the result.
        caches = [
            (torch.randn(shape, generator=generator) * 100).to(device, dtype)
            for _ in range(model.num_layers)
        ]
        order = torch.randperm(num_blocks, generator=generator).tolist()
        return cls(caches, block_size, order)

    def schedule(
        self, chunks: dict[int, list[int]], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Append each sequence's new tokens; returns (input_ids, positions, metadata)."""
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        for seq, tokens in chunks.items():
            start = self.lengths.get(seq, 0)
            end = start + len(tokens)
            table = self.block_tables.setdefault(seq, [])
            while len(table) * self.block_size < end:
                table.append(self.free_blocks.pop())
            for pos in range(start, end):
                slots.append(
                    table[pos // self.block_size] * self.block_size + pos % self.block_size
                )
            ids.extend(tokens)
            positions.extend(range(start, end))
            query_lens.append(len(tokens))
            seq_lens.append(end)
            self.lengths[seq] = end
        width = max(len(self.block_tables[s]) for s in chunks)
        tables = torch.zeros(len(chunks), width, dtype=torch.int32)
        for row, seq in enumerate(chunks):
            tables[row, : len(self.block_tables[seq])] = torch.tensor(self.block_tables[seq])
        starts = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32)
        metadata = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            query_start_loc=starts.to(device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=tables.to(device),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
        )
        return (
            torch.tensor(ids, device=device),
            torch.tensor(positions, device=device),
            metadata,
        )


def build_schedule(
    prompt_lens: list[int], chunked_len: int, first_chunk: int, decode_steps: int
) -> tuple[dict[int, int], list[Step]]:
    """Sequences 0..n-1 prefill their prompts in step 0 and then decode one token per step;
    sequence n prefills in two chunks (steps 0 and 1) and then decodes alongside.

    Returns each sequence's total length and the steps.
    """
    chunked = len(prompt_lens)
    steps: list[Step] = [
        {**{s: (0, p) for s, p in enumerate(prompt_lens)}, chunked: (0, first_chunk)},
        {**{s: (p, p + 1) for s, p in enumerate(prompt_lens)}, chunked: (first_chunk, chunked_len)},
    ]
    for d in range(1, decode_steps):
        step = {s: (p + d, p + d + 1) for s, p in enumerate(prompt_lens)}
        step[chunked] = (chunked_len + d - 1, chunked_len + d)
        steps.append(step)
    totals = {s: p + decode_steps for s, p in enumerate(prompt_lens)}
    totals[chunked] = chunked_len + decode_steps - 1
    return totals, steps


def make_sequences(
    prompts: list[list[int]], totals: dict[int, int], vocab: int, seed: int
) -> dict[int, list[int]]:
    """Each sequence's full token list: its given prompt (none for the chunked one), then
    random tokens up to its total length."""
    generator = torch.Generator().manual_seed(seed)
    sequences = {}
    for s, n in totals.items():
        given = prompts[s] if s < len(prompts) else []
        extra = torch.randint(0, vocab, (n - len(given),), generator=generator).tolist()
        sequences[s] = list(given) + extra
    return sequences


def random_prompts(lengths: list[int], vocab: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in lengths]


def run_schedule(
    model: LlamaForCausalLM,
    sequences: dict[int, list[int]],
    steps: list[Step],
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> list[Row]:
    """Runs each step through our model; returns a row for every token fed."""
    total_tokens = sum(len(ids) for ids in sequences.values())
    num_blocks = total_tokens // block_size + 2 * len(sequences) + 4
    cache = PagedCache.create(model, num_blocks, block_size, dtype, device, seed=7)
    rows: list[Row] = []
    with torch.no_grad():
        for step in steps:
            chunks = {s: sequences[s][a:b] for s, (a, b) in step.items()}
            input_ids, positions, metadata = cache.schedule(chunks, device)
            with forward_context(metadata, cache.kv_caches):
                hidden = model(input_ids, positions)
            logits = model.compute_logits(hidden)
            assert logits.dtype == torch.float32
            assert logits.shape == (len(input_ids), model.vocab_size)
            logits = logits.cpu()
            offset = 0
            for s, (a, b) in step.items():
                for i, pos in enumerate(range(a, b)):
                    rows.append((s, pos, logits[offset + i]))
                offset += b - a
    assert len(rows) == sum(len(ids) for ids in sequences.values()), "every token fed once"
    return rows


def hf_logits(
    model_dir: Path,
    sequences: dict[int, list[int]],
    dtype: torch.dtype,
    device: torch.device,
    attn_implementation: str = "eager",
) -> dict[int, torch.Tensor]:
    """transformers' logits (as fp32, on CPU) for every position of every full sequence."""
    hf = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
    ).to(device)
    hf.eval()
    with torch.no_grad():
        return {
            s: hf(torch.tensor([ids], device=device)).logits[0].float().cpu()
            for s, ids in sequences.items()
        }


def relative_errors(rows: list[Row], reference: dict[int, torch.Tensor]) -> list[float]:
    """Per row: max |ours - reference| / max |reference|."""
    return [
        ((row - reference[s][pos]).abs().max() / reference[s][pos].abs().max()).item()
        for s, pos, row in rows
    ]
