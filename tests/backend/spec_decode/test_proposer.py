"""The n-gram proposer against a brute-force statement of prompt lookup."""

from __future__ import annotations

import random

import pytest

from pagedserve.backend.spec_decode.proposer import NgramProposer


def reference(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Every (n, start) pair, longest n first, latest start first; the first with a
    non-empty continuation wins."""
    candidates = [
        (n, start)
        for n in range(max_n, min_n - 1, -1)
        if n < len(tokens)
        for start in range(len(tokens) - n - 1, -1, -1)
    ]
    for n, start in candidates:
        if tokens[start : start + n] == tokens[-n:] and tokens[start + n : start + n + k]:
            return tokens[start + n : start + n + k]
    return []


def test_proposes_what_followed_the_latest_match_of_the_longest_tail() -> None:
    proposer = NgramProposer(num_speculative_tokens=3, min_n=2, max_n=3)
    #          0  1  2  3  4  5  6  7  8  9
    tokens = [7, 1, 2, 9, 9, 1, 2, 5, 6, 1, 2]
    # Tail [6, 1, 2] (n=3) never occurred before; [1, 2] last occurred at 5: 5, 6, 1 follow.
    assert proposer.propose([tokens]) == [[5, 6, 1]]
    assert proposer.propose([[1, 2, 3]]) == [[]]  # no earlier occurrence
    assert proposer.propose([[4]]) == [[]]


@pytest.mark.parametrize("seed", range(5))
def test_matches_the_brute_force_lookup_on_random_sequences(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(200):
        k, min_n = rng.randint(1, 5), rng.randint(1, 3)
        max_n = rng.randint(min_n, 5)
        tokens = [rng.randrange(4) for _ in range(rng.randint(1, 30))]
        proposer = NgramProposer(k, min_n, max_n)
        assert proposer.propose([tokens]) == [reference(tokens, k, min_n, max_n)]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        NgramProposer(num_speculative_tokens=0)
    with pytest.raises(ValueError, match="prompt_lookup_min <= prompt_lookup_max"):
        NgramProposer(num_speculative_tokens=2, min_n=4, max_n=3)
