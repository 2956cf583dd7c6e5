"""Frequency checks shared by the sampler tests (torch path) and the sampling kernel's tests.

A test draws n independent tokens from one row of logits and compares each token's frequency
with its probability under the distribution the parameters define, at a tolerance that a
correct sampler exceeds with probability at most ``FALSE_FAILURE`` (for any seed). Before that,
each wrong distribution the test lists (what a broken sampler would draw from) is shown to be
told apart by the same check, so a test cannot pass by having logits too flat to notice.
"""

from __future__ import annotations

import math

import torch

FALSE_FAILURE = 1e-6


def tolerance(p: torch.Tensor, n: int, failure: float = FALSE_FAILURE) -> torch.Tensor:
    """Per token, a t with P(|freq - p| >= t) <= failure / V, where freq is the frequency of a
    token of probability p in n independent draws and V = p.numel().

    freq is the mean of n independent indicators of variance p (1 - p), each within 1 of p, so
    Bernstein's inequality gives P(|freq - p| >= t) <= 2 exp(-n t^2 / (2 p (1 - p) + 2 t / 3)).
    Setting the right side to failure / V, with L = ln(2 V / failure), and solving for t:

        t = L / (3 n) + sqrt((L / (3 n))^2 + 2 p (1 - p) L / n)

    By the union bound, every token of the vocabulary is then within its t of its probability
    except with probability ``failure``. Unlike the normal approximation (about 4 sqrt(p (1 - p)
    / n)) it holds for small p too. For n = 20000, V = 50 and failure = 1e-6 (L = 18.4):
    t = 0.022 at p = 0.5, 0.013 at p = 0.1, 0.0063 at p = 0.02 and 0.0006 at p = 0.
    """
    a = math.log(2 * p.numel() / failure) / (3 * n)
    return a + torch.sqrt(a * a + 6 * a * p * (1 - p))


def assert_frequencies(
    freq: torch.Tensor, expected: torch.Tensor, wrong: dict[str, torch.Tensor], n: int
) -> None:
    """``freq`` (of ``n`` draws) is within tolerance of ``expected`` on every token; first, each
    of the ``wrong`` distributions is shown to fail that check.

    A wrong distribution q fails it when, on some token, |q - expected| exceeds
    tolerance(expected) + tolerance(q): a sampler drawing from q lands within tolerance(q) of q
    there (except with probability FALSE_FAILURE), so beyond tolerance(expected) of expected."""
    expected = expected.double()
    tol = tolerance(expected, n)
    for name, q in wrong.items():
        q = q.double()
        margin = (q - expected).abs() - tol - tolerance(q, n)
        assert margin.max() > 0, f"these logits cannot tell a sampler that {name} apart"
    excess = (freq - expected).abs() - tol
    worst = int(excess.argmax())
    assert excess[worst] <= 0, (
        f"token {worst}: frequency {float(freq[worst]):.4f}, probability "
        f"{float(expected[worst]):.4f}, tolerance {float(tol[worst]):.4f}"
    )


def assert_support(freq: torch.Tensor, allowed: torch.Tensor) -> None:
    """Tokens the filters remove have probability exactly 0: not one draw may land on them."""
    drawn = set(torch.nonzero(freq).flatten().tolist())
    assert drawn <= set(torch.nonzero(allowed).flatten().tolist())


def renormalised(probs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``probs`` restricted to the tokens ``keep`` marks, renormalised."""
    kept = torch.where(keep, probs, torch.zeros_like(probs))
    return kept / kept.sum()


def top_n(probs: torch.Tensor, n: int) -> torch.Tensor:
    """The mask of the n most probable tokens."""
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep[probs.topk(n).indices] = True
    return keep
