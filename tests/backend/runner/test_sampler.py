"""Sampler: greedy, filters, penalties, seeds and logprobs against direct torch computations.

Every random draw is seeded: the logits through the autouse fixture below (torch's global
generator, reset before each test), the sampler's draws through the generators ``run`` builds.
The statistical tests compare empirical token frequencies with the distribution the parameters
define, at the tolerances ``tests.sampling_stats`` derives (a correct sampler fails one
comparison with probability at most 1e-6, for any seed).
"""

from __future__ import annotations

import pytest
import torch

from pagedserve.backend.engine.request import Request
from pagedserve.backend.runner.sampler import Sampler, SamplingBatch
from pagedserve.backend.sampling_params import SamplingParams
from tests.sampling_stats import assert_support, renormalised, top_n
from tests.sampling_stats import assert_frequencies as _assert_frequencies

VOCAB = 50
# The statistical tests first check that their logits can tell each mistake they list apart
# from the right distribution (assert_frequencies): with this seed they all can. Not every
# seed gives such logits (a row may have one dominant token, so top_p=0.5 keeps it alone);
# another seed fails those checks loudly rather than testing less.
LOGITS_SEED = 1
# Draws per frequency test (one row each; 20k rows of 50 logits sample in well under a second).
N_DRAWS = 20_000


@pytest.fixture(autouse=True)
def seeded_logits() -> None:
    """Each test draws its logits from torch's global generator, seeded the same every time."""
    torch.manual_seed(LOGITS_SEED)


def req(rid: str, prompt: list[int] | None = None, out: list[int] | None = None, **kw) -> Request:
    r = Request(rid, prompt or [1, 2, 3], SamplingParams(**kw), eos_token_ids=frozenset({0}))
    r.output_token_ids = list(out or [])
    return r


def run(requests: list[Request], logits: torch.Tensor, seed: int = 0, gens=None):
    g = torch.Generator().manual_seed(seed)
    for r, gen in zip(requests, gens if gens is not None else [None] * len(requests)):
        r.generator = gen
    batch = SamplingBatch.from_requests(requests, VOCAB, torch.device("cpu"))
    return Sampler(g).sample(logits.clone(), batch).to_host()


def test_greedy_is_argmax() -> None:
    logits = torch.randn(4, VOCAB)
    out = run([req(str(i), temperature=0.0) for i in range(4)], logits)
    assert out.token_ids == logits.argmax(-1).tolist()


def test_top_k_one_is_argmax_even_when_sampling() -> None:
    logits = torch.randn(6, VOCAB)
    out = run([req(str(i), temperature=1.5, top_k=1) for i in range(6)], logits)
    assert out.token_ids == logits.argmax(-1).tolist()


def test_mixed_greedy_and_random_rows() -> None:
    logits = torch.randn(2, VOCAB)
    out = run([req("g", temperature=0.0), req("r", temperature=1.0, top_k=1)], logits)
    assert out.token_ids == logits.argmax(-1).tolist()


def assert_frequencies(
    freq: torch.Tensor, expected: torch.Tensor, wrong: dict[str, torch.Tensor]
) -> None:
    _assert_frequencies(freq, expected, wrong, N_DRAWS)


def empirical(params: dict, logits_row: torch.Tensor, n: int = N_DRAWS) -> torch.Tensor:
    """Token frequencies of ``n`` independent draws (one row each) with ``params``."""
    logits = logits_row.expand(n, VOCAB).contiguous()
    out = run([req(str(i), **params) for i in range(n)], logits, seed=1)
    return torch.bincount(torch.tensor(out.token_ids), minlength=VOCAB).double() / n


def test_temperature_sampling_matches_softmax() -> None:
    row = torch.randn(VOCAB) * 2
    freq = empirical({"temperature": 0.7}, row)
    expected = torch.softmax(row / 0.7, -1)
    wrong = {
        "ignores the temperature": torch.softmax(row, -1),
        "multiplies by the temperature": torch.softmax(row * 0.7, -1),
    }
    assert_frequencies(freq, expected, wrong)


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    row = torch.randn(VOCAB) * 2
    freq = empirical({"temperature": 1.0, "top_p": 0.5}, row)
    probs = torch.softmax(row, -1)
    sorted_p = probs.sort(descending=True).values
    # The smallest prefix of the sorted tokens whose mass reaches 0.5: every token whose
    # predecessors have not reached it yet.
    keep = int((sorted_p.cumsum(0) - sorted_p < 0.5).sum())
    assert keep >= 2, "these logits cannot test keeping one token too few"
    expected = renormalised(probs, top_n(probs, keep))
    assert_support(freq, expected > 0)
    wrong = {
        "keeps one token too many": renormalised(probs, top_n(probs, keep + 1)),
        "keeps one token too few": renormalised(probs, top_n(probs, keep - 1)),
        "ignores top_p": probs,
    }
    assert_frequencies(freq, expected, wrong)


def test_top_k_and_min_p_restrict_support() -> None:
    row = torch.randn(VOCAB) * 2
    probs = torch.softmax(row, -1)

    freq = empirical({"temperature": 1.0, "top_k": 5}, row)
    expected = renormalised(probs, top_n(probs, 5))
    assert_support(freq, expected > 0)
    wrong = {
        "keeps k + 1 tokens": renormalised(probs, top_n(probs, 6)),
        "keeps k - 1 tokens": renormalised(probs, top_n(probs, 4)),
    }
    assert_frequencies(freq, expected, wrong)

    # min_p keeps the tokens at least min_p times as probable as the most probable one.
    freq = empirical({"temperature": 1.0, "min_p": 0.2}, row)
    expected = renormalised(probs, probs >= 0.2 * probs.max())
    assert_support(freq, expected > 0)
    wrong = {
        "compares with min_p itself, not min_p x the top probability": renormalised(
            probs, probs >= 0.2
        ),
        "ignores min_p": probs,
    }
    assert_frequencies(freq, expected, wrong)


def test_seeded_rows_do_not_depend_on_batch_composition() -> None:
    logits = torch.randn(1, VOCAB)

    def draw(others: int) -> list[int]:
        tokens = []
        g = torch.Generator().manual_seed(1234)
        for _ in range(5):
            reqs = [req("seeded", temperature=1.0, seed=1234)] + [req(f"o{i}", temperature=1.0) for i in range(others)]
            batch_logits = torch.cat([logits, torch.randn(others, VOCAB)])
            out = run(reqs, batch_logits, seed=others, gens=[g] + [None] * others)
            tokens.append(out.token_ids[0])
        return tokens

    assert draw(0) == draw(3) == draw(7)


def test_penalties_match_their_definitions() -> None:
    logits = torch.randn(1, VOCAB)
    r = req("p", prompt=[3, 4], out=[4, 5, 5], temperature=0.0, repetition_penalty=1.3,
            presence_penalty=0.5, frequency_penalty=0.25)
    expected = logits.clone()[0]
    for t in {3, 4, 5}:
        expected[t] = expected[t] / 1.3 if expected[t] > 0 else expected[t] * 1.3
    for t, count in {4: 1, 5: 2}.items():
        expected[t] -= 0.25 * count + 0.5
    out = run([r], logits)
    assert out.token_ids == [int(expected.argmax())]
    batch = SamplingBatch.from_requests([r], VOCAB, torch.device("cpu"))
    processed = logits.clone()
    for processor in batch.processors:
        processed = processor.apply(processed)
    torch.testing.assert_close(processed[0], expected)


def test_min_tokens_bans_eos_and_stop_ids() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 0] = 10.0  # eos
    logits[0, 7] = 9.0  # a stop token id
    r = req("m", temperature=0.0, min_tokens=2, stop_token_ids=[7])
    assert run([r], logits).token_ids != [0] and run([r], logits).token_ids != [7]
    r.output_token_ids = [1, 2]
    assert run([r], logits).token_ids == [0]


def test_logprobs_are_raw_log_softmax_with_top_n() -> None:
    logits = torch.randn(2, VOCAB)
    out = run([req("a", temperature=0.0, logprobs=3), req("b", temperature=0.0)], logits)
    ref = torch.log_softmax(logits, -1)
    lp = out.logprobs[0]
    assert lp is not None and out.logprobs[1] is None
    assert abs(lp.logprob - float(ref[0, out.token_ids[0]])) < 1e-6
    top_vals, top_ids = ref[0].topk(3)
    assert [t for t, _ in lp.top] == top_ids.tolist()
    assert torch.allclose(torch.tensor([v for _, v in lp.top]), top_vals)


def test_logit_bias_adds_to_its_rows_only() -> None:
    logits = torch.randn(3, VOCAB)
    top = logits.argmax(-1).tolist()
    favoured = [(t + 1) % VOCAB for t in top]
    requests = [
        req("ban", temperature=0.0, logit_bias={top[0]: -100.0}),
        req("plain", temperature=0.0),
        req("force", temperature=0.0, logit_bias={favoured[2]: 100.0, top[2]: -1.0}),
    ]
    out = run(requests, logits)
    second = logits[0].clone()
    second[top[0]] = float("-inf")
    assert out.token_ids == [int(second.argmax()), top[1], favoured[2]]


def test_logit_bias_is_added_not_set() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 4] = 3.0
    logits[0, 9] = 2.0
    # +0.5 leaves 9 behind 4 (a bias that set the logit to 0.5 would too, but +1.5 must win).
    assert run([req("a", temperature=0.0, logit_bias={9: 0.5})], logits).token_ids == [4]
    assert run([req("b", temperature=0.0, logit_bias={9: 1.5})], logits).token_ids == [9]


def test_logit_bias_leaves_the_reported_logprobs_the_models() -> None:
    logits = torch.randn(1, VOCAB)
    out = run([req("a", temperature=0.0, logprobs=1, logit_bias={5: 100.0})], logits)
    assert out.token_ids == [5]
    lp = out.logprobs[0]
    assert lp is not None
    assert abs(lp.logprob - float(torch.log_softmax(logits, -1)[0, 5])) < 1e-6


def test_a_vanishing_temperature_is_greedy() -> None:
    """A temperature so small that dividing by it would overflow float32 logits draws the
    argmax (the limit of sampling as the temperature falls), not whatever the overflow picks."""
    logits = torch.randn(4, VOCAB)
    out = run([req(str(i), temperature=t) for i, t in enumerate([1e-40, 1e-30, 1e-6, 0.0])], logits)
    assert out.token_ids == logits.argmax(-1).tolist()
