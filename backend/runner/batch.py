"""One step's flat batch: built on the host by rank 0 from the scheduler's output, run by
every rank; the device-side slots that carry in-flight tokens into the next step's inputs.

A ``StepBatch`` holds the step's host arrays. With tensor parallelism rank 0 sends it to the
other ranks, and every rank derives positions, KV slots and attention metadata from it with the
same code, so the ranks' forwards agree by construction. On the wire it is one int64 array
behind a fixed-size header of its dimensions.

Overlapped scheduling, as one mechanism: every sampled id is also written, on the device, into
its request's slot of ``InFlightTokens`` (indexed by the request's block-table row). A step
scheduled before the previous step's ids reached the host marks the inputs it does not know
(``in_flight_rows``) and reads them from those slots, in stream order, so the host never waits.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from pagedserve.backend.engine.scheduler import SchedulerOutput

# (num_tokens, num_seqs, max_blocks, num_sample_rows, num_in_flight_rows)
HEADER_LEN = 5


def _empty_rows() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


@dataclass
class StepBatch:
    input_ids: np.ndarray  # [num_tokens] int64, the sequences' new tokens concatenated
    query_lens: np.ndarray  # [num_seqs] int32, new tokens per sequence
    seq_lens: np.ndarray  # [num_seqs] int32, context length after this step
    block_tables: np.ndarray  # [num_seqs, max_blocks] int32, padded with 0
    sample_rows: np.ndarray  # [num_samples] int64, token rows whose logits are sampled
    # [num_in_flight] int64: token rows whose input id is still being sampled by the previous
    # step on rank 0's device; their input_ids entries are placeholders.
    in_flight_rows: np.ndarray = field(default_factory=_empty_rows)

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
            [self.num_tokens, num_seqs, max_blocks, len(self.sample_rows), len(self.in_flight_rows)],
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
                self.in_flight_rows,
            ]
        ).astype(np.int64, copy=False)

    @staticmethod
    def payload_len(header: np.ndarray) -> int:
        num_tokens, num_seqs, max_blocks, num_samples, num_in_flight = (int(x) for x in header)
        return num_tokens + num_seqs * (2 + max_blocks) + num_samples + num_in_flight

    @classmethod
    def unpack(cls, header: np.ndarray, payload: np.ndarray) -> StepBatch:
        num_tokens, num_seqs, max_blocks, num_samples, num_in_flight = (int(x) for x in header)
        ends = np.cumsum(
            [num_tokens, num_seqs, num_seqs, num_seqs * max_blocks, num_samples, num_in_flight]
        )
        if ends[-1] != len(payload):
            raise ValueError(f"step payload has {len(payload)} values, header says {ends[-1]}")
        ids, qlens, slens, tables, rows, in_flight, _ = np.split(payload, ends)
        return cls(
            input_ids=ids,
            query_lens=qlens.astype(np.int32),
            seq_lens=slens.astype(np.int32),
            block_tables=tables.astype(np.int32).reshape(num_seqs, max_blocks),
            sample_rows=rows,
            in_flight_rows=in_flight,
        )


@dataclass
class StepInputs:
    """Rank 0's view of a step: the batch every rank runs, plus where its in-flight inputs and
    its sampled ids live in ``InFlightTokens`` (requests' block-table rows)."""

    batch: StepBatch
    in_flight_slots: np.ndarray  # [num_in_flight] int64, aligned with batch.in_flight_rows
    sample_slots: np.ndarray  # [num_samples] int64, aligned with batch.sample_rows


def build_step_inputs(sched: SchedulerOutput) -> StepInputs:
    """The step's flat batch from the scheduler's output (rows in scheduling order)."""
    ids: list[int] = []
    query_lens: list[int] = []
    seq_lens: list[int] = []
    sample_rows: list[int] = []
    sample_slots: list[int] = []
    in_flight_rows: list[int] = []
    in_flight_slots: list[int] = []
    table_rows: list[int] = []
    max_blocks = 0
    for s in sched.scheduled:
        req = s.request
        n = s.num_new_tokens
        start = req.num_computed_tokens
        end = start + n
        known = req.num_tokens
        if s.num_drafts:  # a decode and its drafts: the known token, then the guesses
            ids.append(req.token_at(start))
            ids.extend(req.draft_token_ids[: s.num_drafts])
        elif end > known:  # its last input is the token the step in flight samples
            if end != known + 1 or not req.num_in_flight:
                raise RuntimeError(f"request {req.request_id}: input token {start} is unknown")
            if start < known:
                ids.extend(req.token_slice(start, known))
            in_flight_rows.append(len(ids))
            in_flight_slots.append(req.table_row)
            ids.append(0)
        elif n == 1:  # decode: a plain int, no per-request list
            ids.append(req.token_at(start))
        else:
            ids.extend(req.token_slice(start, end))
        table_rows.append(req.table_row)
        if len(req.block_ids) > max_blocks:
            max_blocks = len(req.block_ids)
        query_lens.append(n)
        seq_lens.append(end)
        if s.samples:  # after the known token and after each draft
            for row in range(len(ids) - 1 - s.num_drafts, len(ids)):
                sample_rows.append(row)
                sample_slots.append(req.table_row)
    batch = StepBatch(
        input_ids=np.asarray(ids, dtype=np.int64),
        query_lens=np.asarray(query_lens, dtype=np.int32),
        seq_lens=np.asarray(seq_lens, dtype=np.int32),
        block_tables=sched.block_table[np.asarray(table_rows, dtype=np.int64), :max_blocks],
        sample_rows=np.asarray(sample_rows, dtype=np.int64),
        in_flight_rows=np.asarray(in_flight_rows, dtype=np.int64),
    )
    return StepInputs(
        batch,
        in_flight_slots=np.asarray(in_flight_slots, dtype=np.int64),
        sample_slots=np.asarray(sample_slots, dtype=np.int64),
    )


class InFlightTokens:
    """Each request's latest sampled id, on the device, at its block-table row. A row is
    written by the step that samples it and read (if at all) by the next step, queued behind
    it on the same stream."""

    def __init__(self, num_rows: int, device: torch.device) -> None:
        self.ids = torch.zeros(max(1, num_rows), dtype=torch.int64, device=device)

    def store(self, slots: torch.Tensor, sampled: torch.Tensor) -> None:
        self.ids.index_copy_(0, slots, sampled)

    def load(self, slots: torch.Tensor) -> torch.Tensor:
        return self.ids.index_select(0, slots)


# -- host to device ------------------------------------------------------------------------------
def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small host tensor to the device without waiting for the device's queued work
    (a plain copy from pageable memory synchronises the stream)."""
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


# Each array's start in the packed buffer, in int64 elements: 16 bytes. Triton specializes a
# kernel on whether each pointer argument is 16-byte aligned, so a slice whose alignment
# changed with the step's sizes would compile a second variant of every kernel it reaches,
# stalling every stream the first time.
_PACK_ALIGN = 2


def pack_arrays(arrays: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """The arrays as one flat int64 buffer, each starting 16-byte aligned; returns the buffer
    and each array's start (in elements)."""
    starts, total = [], 0
    for a in arrays:
        starts.append(total)
        total += -(-a.size // _PACK_ALIGN) * _PACK_ALIGN
    packed = np.zeros(total, dtype=np.int64)
    for a, start in zip(arrays, starts):
        packed[start : start + a.size] = a.reshape(-1)
    return packed, starts


def arrays_to_device(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Several small integer arrays on the device through one pinned buffer and one copy (each
    transfer costs the host tens of microseconds, a step has about ten of them); each comes
    back with its own shape and dtype. On the CPU they are the arrays themselves, uncopied."""
    if device.type != "cuda":
        return [torch.from_numpy(a) for a in arrays]
    packed, starts = pack_arrays(arrays)
    flat = to_device(torch.from_numpy(packed), device)
    out = []
    for a, start in zip(arrays, starts):
        part = flat[start : start + a.size].view(a.shape)
        out.append(part if a.dtype == np.int64 else part.to(_torch_dtype(a.dtype)))
    return out


@functools.cache
def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype
