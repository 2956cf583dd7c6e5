"""Draft-token proposers: the seam speculative decoding plugs into.

A proposer looks at a decoding request's tokens and guesses the next few. How the engine uses
the guesses (not wired yet):

1. after a step's ids land, the core asks the proposer for drafts of the requests that decode
   next and keeps them on each ``Request``;
2. the scheduler gives such a request ``1 + len(drafts)`` new tokens (its known token, then
   the drafts) and the block manager room for them;
3. the runner's batch marks every position of those tokens as a sample row, the target model
   scores them in one forward (the varlen attention path already takes multi-token queries over
   a cached prefix), and the sampler verifies: greedy accepts drafts while they equal the
   target's argmax; sampled requests use rejection sampling, so the output distribution is the
   target's exactly;
4. the accepted prefix plus one target token become the step's output; K/V written for
   rejected positions are dropped by moving the request's computed count back (and freeing a
   block that only they used).

Proposers that need no trained extra weights: n-gram prompt lookup (below) and a small draft
model with its own KV cache; EAGLE- and MTP-style heads fit the same interface, reading the
target's hidden states from a hook on the runner.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class Proposer(Protocol):
    """Guesses up to ``num_speculative_tokens`` next tokens per request."""

    @property
    def num_speculative_tokens(self) -> int: ...

    def propose(self, token_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        """For each request's known tokens (prompt + output), its drafts (possibly none)."""
        ...


@dataclass(frozen=True)
class NgramProposer:
    """Prompt lookup: find the latest earlier occurrence of the sequence's last n tokens
    (longest n first, from ``max_n`` down to ``min_n``) and propose what followed it. Pays off
    where outputs copy their input: code edits, extraction, summaries that quote."""

    num_speculative_tokens: int
    min_n: int = 2
    max_n: int = 5

    def __post_init__(self) -> None:
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        if not 1 <= self.min_n <= self.max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {self.min_n} and {self.max_n}")

    def propose(self, token_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        return [self._lookup(list(tokens)) for tokens in token_ids]

    def _lookup(self, tokens: list[int]) -> list[int]:
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            tail = tokens[-n:]
            # The latest match that ends before the tail itself (so something follows it).
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start : start + n] == tail:
                    return tokens[start + n : start + n + self.num_speculative_tokens]
        return []
