"""Draft-token proposers: the seam speculative decoding plugs into.

A proposer looks at a decoding request's tokens and guesses the next few. The engine
(``engine/core.py``) uses the guesses for greedy requests:

1. before a step is scheduled, the core asks the proposer for drafts of the running requests
   that decode greedily next (no penalties, logit bias, logprobs or pending min_tokens) and
   keeps them on each ``Request``;
2. the scheduler gives such a request ``1 + len(drafts)`` new tokens (its known token, then
   the drafts), as many drafts as the token budget has room for, and the block manager room
   for them;
3. the step's batch samples after the known token and after each draft: the target model
   scores them all in one forward (the varlen attention path takes multi-token queries over a
   cached prefix; such a step runs eagerly, outside the decode CUDA graphs);
4. the drafts the target's argmax agrees with, up to the first disagreement, plus the target's
   own token there are the step's output, processed one by one (a stop string or max_tokens
   may end the request inside them); the K/V written for rejected drafts is dropped by moving
   the request's computed count back and giving back the blocks only they used. They never
   reach the prefix cache, which registers known tokens only.

Overlapped scheduling is off while speculating: the next step would have to be scheduled
before this one says how many tokens it accepted. Sampled requests (rejection sampling
against a draft distribution) and a draft-model proposer are not wired yet.

Proposers that need no trained extra weights: n-gram prompt lookup (below) and a small draft
model with its own KV cache; EAGLE- and MTP-style heads fit the same interface, reading the
target's hidden states from a hook on the runner.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, get_args

from pagedserve.backend.config import SpeculativeConfig, SpeculativeMethod


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
            raise ValueError(
                f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {self.min_n} and {self.max_n}"
            )

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


def build_proposer(config: SpeculativeConfig) -> Proposer | None:
    """The configured proposer, or None when speculative decoding is off."""
    if config.speculative_method is None:
        return None
    if config.speculative_method == "ngram":
        return NgramProposer(
            config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max
        )
    raise ValueError(
        f"speculative method must be one of {', '.join(get_args(SpeculativeMethod))}, "
        f"got {config.speculative_method!r}"
    )
