"""Each penalised request's token history on the device: the ids it has seen (prompt and
outputs, for the repetition penalty) and how often it generated each (presence and frequency
penalties).

The history lives on the device so that penalties never need the host's token lists. With
overlapped scheduling a step is built before the host has the ids the previous step sampled;
the sampler appends each step's sampled ids of penalised rows here right after drawing them, on
the device and in stream order, so the next step's penalties (queued behind that) count the
token still in flight, and no step waits for the host.

A request gets a row the first time it is sampled with a penalty, initialised then from its
host token lists (it has no token in flight yet: only being sampled makes one). It keeps the row
while it lives, through preemption too (recomputation keeps its outputs, and the row holds
them), and gives it back when it finishes (``free``). A step queued before it finished may
still append to that row; the row's next holder is initialised by work queued after that step
on the same stream, which overwrites it.

Nothing is allocated until the first penalised request; the tensors then grow (doubling) when
more penalised requests live at once than there are rows, copying the rows over on the stream.
With tensor parallelism only rank 0 samples, so only rank 0 ever holds a history.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pagedserve.backend.engine.request import Request
from pagedserve.backend.runner.batch import arrays_to_device


class TokenHistory:
    """Rows of ``seen`` [rows, V] bool (prompt and outputs) and ``counts`` [rows, V] fp32
    (outputs), one per live penalised request (``Request.history_row``)."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.seen = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)
        self.counts = torch.zeros(0, vocab_size, dtype=torch.float32, device=device)
        # Each row's request, None where the row is free; the free rows (the last one pushed is
        # reused first).
        self._holders: list[Request | None] = []
        self._free: list[int] = []

    @property
    def num_rows(self) -> int:
        """Rows allocated (held or free)."""
        return len(self._holders)

    @property
    def num_held(self) -> int:
        return len(self._holders) - len(self._free)

    def holds(self, request: Request) -> bool:
        """Whether ``request`` holds a row of this history (a row number alone is not enough:
        the row may have been given back, or belong to another history)."""
        row = request.history_row
        return 0 <= row < len(self._holders) and self._holders[row] is request

    def rows_for(self, requests: Sequence[Request], batch_rows: Sequence[int] | None) -> HistoryRows:
        """The history rows of ``requests``, which sit at ``batch_rows`` of a step's batch (None:
        they are the whole batch, in order). Requests without a row get one, initialised before
        anything queued later reads it."""
        missing = [r for r in requests if not self.holds(r)]
        if missing:
            self._assign(missing)
        rows = np.fromiter((r.history_row for r in requests), dtype=np.int64, count=len(requests))
        if batch_rows is None:
            (rows_t,) = arrays_to_device([rows], self.device)
            return HistoryRows(self, rows_t, None)
        index = np.asarray(batch_rows, dtype=np.int64)
        rows_t, index_t = arrays_to_device([rows, index], self.device)
        return HistoryRows(self, rows_t, index_t)

    def free(self, request: Request) -> None:
        """Give back a finished request's row (a no-op if it holds none)."""
        if self.holds(request):
            self._holders[request.history_row] = None
            self._free.append(request.history_row)
        request.history_row = -1

    def append(self, rows: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Record one sampled id per row (``rows`` distinct), on the device."""
        flat = rows * self.vocab_size + token_ids
        self.seen.view(-1).index_fill_(0, flat, True)
        self.counts.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))

    # -- rows ----------------------------------------------------------------------------------
    def _assign(self, requests: list[Request]) -> None:
        """A free row for each request (growing when too few are free), initialised from its
        host lists. A new row must start complete, so none may have a token in flight."""
        for r in requests:
            if r.num_in_flight:
                raise RuntimeError(
                    f"request {r.request_id}: its history would miss {r.num_in_flight} "
                    "token(s) still in flight"
                )
        if len(requests) > len(self._free):
            self._grow(max(self.num_held + len(requests), 2 * self.num_rows))
        for r in requests:
            row = self._free.pop()
            self._holders[row] = r
            r.history_row = row
        self._initialise(requests)

    def _grow(self, num_rows: int) -> None:
        """Larger tensors holding the old rows; the copy is queued behind every append to them."""
        old = self.num_rows
        seen = torch.zeros(num_rows, self.vocab_size, dtype=torch.bool, device=self.device)
        counts = torch.zeros(num_rows, self.vocab_size, dtype=torch.float32, device=self.device)
        seen[:old] = self.seen
        counts[:old] = self.counts
        self.seen, self.counts = seen, counts
        self._holders += [None] * (num_rows - old)
        # Popped from the end: the lowest new row goes first.
        self._free = list(range(num_rows - 1, old - 1, -1)) + self._free

    def _initialise(self, requests: list[Request]) -> None:
        """Each new holder's row from its host token lists, all in one copy to the device. The
        row is cleared first: a step queued for its previous holder may have written it."""
        vocab = self.vocab_size
        rows = np.array([r.history_row for r in requests], dtype=np.int64)
        seen = np.concatenate(
            [np.asarray(r.all_token_ids, dtype=np.int64) + r.history_row * vocab for r in requests]
        )
        outputs = np.concatenate(
            [np.asarray(r.output_token_ids, dtype=np.int64) + r.history_row * vocab for r in requests]
        )
        rows_t, seen_t, outputs_t = arrays_to_device([rows, seen, outputs], self.device)
        self.seen.index_fill_(0, rows_t, False)
        self.counts.index_fill_(0, rows_t, 0.0)
        self.seen.view(-1).index_fill_(0, seen_t, True)
        self.counts.view(-1).index_add_(0, outputs_t, torch.ones_like(outputs_t, dtype=torch.float32))


@dataclass
class HistoryRows:
    """Some rows of a step's batch and their rows of the history, both on the device."""

    history: TokenHistory
    rows: torch.Tensor  # [P] int64, rows of the history
    batch_rows: torch.Tensor | None  # [P] int64, rows of the batch; None: all of them, in order

    def seen(self) -> torch.Tensor:
        """[P, V] bool: the ids each row has seen so far (a copy, taken now in stream order)."""
        return self.history.seen.index_select(0, self.rows)

    def counts(self) -> torch.Tensor:
        """[P, V] fp32: how often each row generated each id so far (a copy)."""
        return self.history.counts.index_select(0, self.rows)

    def append(self, sampled: torch.Tensor) -> None:
        """Record the batch's sampled ids ([N], every row of the batch) of these rows."""
        ids = sampled if self.batch_rows is None else sampled.index_select(0, self.batch_rows)
        self.history.append(self.rows, ids)
