"""The sort-free sampling kernel against the torch reference of the kept set and against the
distribution the parameters define.

Exactness of the filters is checked directly: the kernel reports each row's smallest kept logit,
which must equal the sort-based reference ``kept_threshold`` bit for bit on random rows (ties and
banned tokens included). The draw is checked by frequencies (``tests.sampling_stats``: a correct
kernel fails one comparison with probability at most 1e-6 whatever the keys) and by
reproducibility: a row's key and position fix its token whatever else is in the batch.
All logits come from torch's generator seeded per test.
"""

from __future__ import annotations

import pytest
import torch

from pagedserve.kernels.sampling import kept_threshold, sample_rows
from tests.sampling_stats import assert_frequencies, assert_support, renormalised, top_n

VOCAB = 50
N_DRAWS = 20_000


@pytest.fixture(autouse=True)
def seeded() -> None:
    torch.manual_seed(7)


def draw(row: torch.Tensor, device: torch.device, temperature: float = 1.0, top_k: int | None = None,
         top_p: float | None = None, min_p: float | None = None, n: int = N_DRAWS) -> torch.Tensor:
    """Frequencies of n draws from one row, each with its own key."""
    x = row.to(device).expand(n, -1).contiguous()

    def col(v: float | None, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        return None if v is None else torch.full((n,), v, dtype=dtype, device=device)

    tokens, _ = sample_rows(
        x, col(temperature), torch.arange(n, device=device) * 7919 + 13,
        torch.zeros(n, dtype=torch.int64, device=device),
        col(top_k, torch.int64), col(top_p), col(min_p))
    return torch.bincount(tokens.cpu(), minlength=row.numel()).double() / n


@pytest.mark.parametrize(("block", "pivots"), [(16, 1), (4096, 8), (16, 4)],
                         ids=["tiles-bisection", "one-tile-8-pivots", "tiles-4-pivots"])
def test_kept_set_equals_the_sorted_reference(device: torch.device, block: int, pivots: int) -> None:
    n = 128
    x = torch.randn(n, VOCAB) * 3
    x[::7, :10] = x[::7, 10:20]  # ties, at the cut too
    x[::5, 3::4] = float("-inf")  # banned tokens
    x[1::9] = x[1::9].round()  # many ties
    temperature = torch.rand(n) * 1.5 + 0.2
    temperature[::11] = 0.0
    top_k = torch.randint(1, VOCAB + 8, (n,))
    top_p = torch.rand(n) * 0.98 + 0.01
    min_p = torch.rand(n) * 0.4
    min_p[::2] = 0.0
    cases = [
        (None, None, None), (top_k, None, None), (None, top_p, None), (None, None, min_p),
        (top_k, top_p, None), (top_k, top_p, min_p),
    ]
    for k, p, mp in cases:
        ref = kept_threshold(x, temperature, k, p, mp)
        on = [None if t is None else t.to(device) for t in (k, p, mp)]
        tokens, smallest = sample_rows(
            x.to(device), temperature.to(device), torch.arange(n, device=device),
            torch.zeros(n, dtype=torch.int64, device=device), *on, block=block, pivots=pivots)
        assert torch.equal(smallest.cpu(), ref), f"top_k={k is not None} top_p={p is not None} min_p={mp is not None}"
        picked = x.gather(1, tokens.cpu().unsqueeze(1)).squeeze(1)
        assert bool((picked >= ref).all()), "a token outside the kept set was drawn"


def test_skipped_tiles_never_hold_a_kept_token(device: torch.device) -> None:
    """A program reads only the tiles whose maximum reaches its search's lower end. Rows whose
    16-token tiles each sit tightly around one value put tile maxima right at the thresholds,
    so a tile skipped wrongly shows in the kept set. One row per program, as on the device
    (a program skips a tile only when none of its rows needs it)."""
    n = 8
    clustered = torch.randn(n, -(-VOCAB // 16)).repeat_interleave(16, dim=1)[:, :VOCAB] * 3
    x = clustered + 0.01 * torch.randn(n, VOCAB)
    temperature = torch.rand(n) + 0.5
    cases = [(torch.randint(3, 30, (n,)), torch.rand(n) * 0.8 + 0.1, None),
             (None, None, torch.rand(n) * 0.3 + 0.05)]
    for k, p, mp in cases:
        ref = kept_threshold(x, temperature, k, p, mp)
        on = [None if t is None else t.to(device) for t in (k, p, mp)]
        _, smallest = sample_rows(
            x.to(device), temperature.to(device), torch.arange(n, device=device),
            torch.zeros(n, dtype=torch.int64, device=device), *on, block=16, pivots=4,
            rows_per_program=1)
        assert torch.equal(smallest.cpu(), ref)


def test_greedy_rows_are_the_first_argmax(device: torch.device) -> None:
    n = 64
    x = torch.randn(n, VOCAB)
    x[::3, 40] = x[::3].max(dim=1).values  # equal maxima, in different tiles: the first wins
    temperature = torch.ones(n)
    temperature[::2] = 0.0
    tokens, _ = sample_rows(
        x.to(device), temperature.to(device), torch.arange(n, device=device),
        torch.zeros(n, dtype=torch.int64, device=device),
        torch.full((n,), 3, device=device), torch.full((n,), 0.5, device=device), block=16)
    greedy = temperature == 0
    assert torch.equal(tokens.cpu()[greedy], x.argmax(dim=1)[greedy])


def test_a_seeded_row_draws_the_same_whatever_shares_the_batch(device: torch.device) -> None:
    row = torch.randn(1, VOCAB)
    key, position = 123456789, 17

    def token(others: int, at: int) -> int:
        x = torch.randn(others + 1, VOCAB)
        x[at] = row
        keys = torch.randint(0, 2**62, (others + 1,))
        keys[at] = key
        positions = torch.randint(0, 500, (others + 1,))
        positions[at] = position
        temperature = torch.rand(others + 1) + 0.5
        temperature[at] = 1.0
        tokens, _ = sample_rows(
            x.to(device), temperature.to(device), keys.to(device), positions.to(device),
            torch.full((others + 1,), 20, device=device), torch.full((others + 1,), 0.9, device=device))
        return int(tokens[at])

    first = token(0, 0)
    assert all(token(others, at) == first for others, at in [(3, 2), (9, 0), (30, 29), (70, 41)])
    # The counter moves with the position: over positions the draws differ.
    x = row.expand(32, -1).contiguous().to(device)
    tokens, _ = sample_rows(
        x, torch.ones(32, device=device), torch.full((32,), key, device=device),
        torch.arange(32, device=device))
    assert len(set(tokens.tolist())) > 1


def test_temperature_draws_follow_the_softmax(device: torch.device) -> None:
    row = torch.randn(VOCAB) * 2
    freq = draw(row, device, temperature=0.7)
    expected = torch.softmax(row / 0.7, -1)
    wrong = {
        "ignores the temperature": torch.softmax(row, -1),
        "multiplies by the temperature": torch.softmax(row * 0.7, -1),
    }
    assert_frequencies(freq, expected, wrong, N_DRAWS)


def test_top_k_keeps_k_and_renormalises(device: torch.device) -> None:
    row = torch.randn(VOCAB) * 2
    probs = torch.softmax(row, -1)
    freq = draw(row, device, top_k=5)
    expected = renormalised(probs, top_n(probs, 5))
    assert_support(freq, expected > 0)
    wrong = {
        "keeps k + 1 tokens": renormalised(probs, top_n(probs, 6)),
        "keeps k - 1 tokens": renormalised(probs, top_n(probs, 4)),
    }
    assert_frequencies(freq, expected, wrong, N_DRAWS)


def test_top_p_cut_over_the_top_k_set(device: torch.device) -> None:
    """top-p keeps the smallest set whose mass, renormalised over the top-k set, reaches p."""
    row = torch.randn(VOCAB) * 1.5
    probs = torch.softmax(row, -1)
    k, p = 12, 0.6
    in_k = renormalised(probs, top_n(probs, k))
    sorted_p = in_k.sort(descending=True).values
    keep = int((sorted_p.cumsum(0) - sorted_p < p).sum())
    assert 2 <= keep < k
    # Over the whole vocabulary instead (no renormalisation over the top-k set), the cut lands
    # on a different count: the test can tell them apart.
    sorted_all = probs.sort(descending=True).values
    keep_unnormalised = int((sorted_all.cumsum(0) - sorted_all < p).sum())
    assert keep_unnormalised != keep
    freq = draw(row, device, top_k=k, top_p=p)
    expected = renormalised(probs, top_n(probs, keep))
    assert_support(freq, expected > 0)
    wrong = {
        "keeps one token too many": renormalised(probs, top_n(probs, keep + 1)),
        "keeps one token too few": renormalised(probs, top_n(probs, keep - 1)),
        "cuts p over the whole vocabulary": renormalised(probs, top_n(probs, min(keep_unnormalised, k))),
    }
    assert_frequencies(freq, expected, wrong, N_DRAWS)


def test_min_p_keeps_tokens_near_the_top(device: torch.device) -> None:
    row = torch.randn(VOCAB) * 2
    probs = torch.softmax(row / 0.8, -1)
    freq = draw(row, device, temperature=0.8, min_p=0.05)
    expected = renormalised(probs, probs >= 0.05 * probs.max())
    assert_support(freq, expected > 0)
    wrong = {
        "compares with min_p itself": renormalised(probs, probs >= 0.05),
        "ignores min_p": probs,
    }
    assert_frequencies(freq, expected, wrong, N_DRAWS)
