"""One engine step's flat batch as host arrays: built by rank 0, run by every rank.

Rank 0 turns the scheduler's output into a ``StepBatch``. With tensor parallelism it sends the
batch to the other ranks, and every rank derives positions, KV slots and attention metadata
from it with the same code, so the ranks' forwards agree by construction. On the wire it is
one int64 array behind a fixed-size header of its dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# (num_tokens, num_seqs, max_blocks, num_sample_rows, num_deferred_rows)
HEADER_LEN = 5


@dataclass
class StepBatch:
    input_ids: np.ndarray  # [num_tokens] int64, the sequences' new tokens concatenated
    query_lens: np.ndarray  # [num_seqs] int32, new tokens per sequence
    seq_lens: np.ndarray  # [num_seqs] int32, context length after this step
    block_tables: np.ndarray  # [num_seqs, max_blocks] int32, padded with 0
    sample_rows: np.ndarray  # [num_samples] int64, token rows whose logits are sampled
    # [num_deferred] int64: token rows whose input id the previous step is still sampling on
    # rank 0's device (overlapped scheduling); their input_ids entries are placeholders.
    deferred_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def query_start_loc(self) -> np.ndarray:
        out = np.zeros(len(self.query_lens) + 1, dtype=np.int32)
        np.cumsum(self.query_lens, out=out[1:])
        return out

    def positions(self) -> np.ndarray:
        """Each new token's position: a sequence's new tokens end at its seq_len."""
        starts = self.query_start_loc()[:-1]
        first = (self.seq_lens - self.query_lens).astype(np.int64)
        offset = np.arange(self.num_tokens, dtype=np.int64) - np.repeat(starts, self.query_lens)
        return np.repeat(first, self.query_lens) + offset

    def slot_mapping(self, positions: np.ndarray, block_size: int) -> np.ndarray:
        """Cache slot of each new token: its block (from the table) times block_size + offset."""
        seq_of_token = np.repeat(np.arange(len(self.query_lens)), self.query_lens)
        blocks = self.block_tables[seq_of_token, positions // block_size].astype(np.int64)
        return blocks * block_size + positions % block_size

    # -- wire format ---------------------------------------------------------------------------
    def header(self) -> np.ndarray:
        num_seqs, max_blocks = self.block_tables.shape
        return np.array(
            [self.num_tokens, num_seqs, max_blocks, len(self.sample_rows), len(self.deferred_rows)],
            dtype=np.int64,
        )

    def payload(self) -> np.ndarray:
        return np.concatenate(
            [
                self.input_ids,
                self.query_lens,
                self.seq_lens,
                self.block_tables.reshape(-1),
                self.sample_rows,
                self.deferred_rows,
            ]
        ).astype(np.int64, copy=False)

    @staticmethod
    def payload_len(header: np.ndarray) -> int:
        num_tokens, num_seqs, max_blocks, num_samples, num_deferred = (int(x) for x in header)
        return num_tokens + num_seqs * (2 + max_blocks) + num_samples + num_deferred

    @classmethod
    def unpack(cls, header: np.ndarray, payload: np.ndarray) -> "StepBatch":
        num_tokens, num_seqs, max_blocks, num_samples, num_deferred = (int(x) for x in header)
        ends = np.cumsum(
            [num_tokens, num_seqs, num_seqs, num_seqs * max_blocks, num_samples, num_deferred]
        )
        if ends[-1] != len(payload):
            raise ValueError(f"step payload has {len(payload)} values, header says {ends[-1]}")
        ids, qlens, slens, tables, rows, deferred, _ = np.split(payload, ends)
        return cls(
            input_ids=ids,
            query_lens=qlens.astype(np.int32),
            seq_lens=slens.astype(np.int32),
            block_tables=tables.astype(np.int32).reshape(num_seqs, max_blocks),
            sample_rows=rows,
            deferred_rows=deferred,
        )
