"""Block-table rows that persist across steps, so a step copies only the blocks that changed.

A step's block table has one row per scheduled sequence. Rebuilding it from every request's
block list each step converts hundreds of Python lists to numpy per step; yet a decoding
sequence gains a block only every ``block_size`` tokens. Each live request therefore keeps a row
here, and a step syncs only what changed since the row was last written, then gathers the rows
it needs with one fancy index.

A row is rewritten whole when the request's block list is a new list object (the block manager
replaces the list when it frees a request's blocks or attaches prefix-cache hits) or shrank;
otherwise only the appended ids are copied. The previous list is kept referenced, so an identity
match cannot come from a recycled object.
"""

from __future__ import annotations

import numpy as np

from pagedserve.backend.engine.request import Request


class PersistentBlockTables:
    def __init__(self, num_rows: int, max_blocks_per_seq: int) -> None:
        self.table = np.zeros((max(1, num_rows), max(1, max_blocks_per_seq)), dtype=np.int32)
        self._rows: dict[str, int] = {}
        self._free = list(range(self.table.shape[0] - 1, -1, -1))
        # Per row: the block list last written and how many of its ids were written.
        self._synced: list[tuple[list[int] | None, int]] = [(None, 0)] * self.table.shape[0]

    def row_of(self, request: Request) -> int:
        """The request's row, brought up to date with its block list."""
        row = self._rows.get(request.request_id)
        if row is None:
            row = self._rows[request.request_id] = self._take_row()
        ids = request.block_ids
        n = len(ids)
        synced, written = self._synced[row]
        if synced is ids and n == written:
            return row
        if n > self.table.shape[1]:
            raise ValueError(f"request {request.request_id} holds {n} blocks; rows hold {self.table.shape[1]}")
        if synced is ids and n > written:
            self.table[row, written:n] = ids[written:]
        else:
            self.table[row, :n] = ids
            self.table[row, n:written] = 0
        self._synced[row] = (ids, n)
        return row

    def gather(self, rows: list[int], num_blocks: int) -> np.ndarray:
        """[len(rows), num_blocks] copy of the given rows, padded with 0 past each row's blocks."""
        return self.table[np.asarray(rows, dtype=np.int64), :num_blocks]

    def release(self, request_id: str) -> None:
        row = self._rows.pop(request_id, None)
        if row is not None:
            self.table[row, : self._synced[row][1]] = 0
            self._synced[row] = (None, 0)
            self._free.append(row)

    def _take_row(self) -> int:
        if not self._free:  # preempted requests keep their rows while they wait: grow
            old = self.table.shape[0]
            self.table = np.concatenate([self.table, np.zeros_like(self.table)])
            self._synced.extend([(None, 0)] * old)
            self._free = list(range(2 * old - 1, old - 1, -1))
        return self._free.pop()
