"""The device token history behind the penalties: rows from the host lists once, then kept up
to date by the steps' sampled ids alone (the host may not have them yet), freed and reused."""

from __future__ import annotations

import pytest
import torch

from pagedserve.backend.engine.request import Request
from pagedserve.backend.runner.sampler import Sampler, SamplingBatch
from pagedserve.backend.runner.token_history import TokenHistory
from pagedserve.backend.sampling_params import SamplingParams

VOCAB = 50
CPU = torch.device("cpu")


def req(rid: str, prompt: list[int], out: list[int] | None = None, **kw) -> Request:
    r = Request(rid, prompt, SamplingParams(temperature=0.0, **kw), eos_token_ids=frozenset({0}))
    r.output_token_ids = list(out or [])
    return r


def defined(logits: torch.Tensor, tokens: list[int], outputs: list[int], params: SamplingParams) -> torch.Tensor:
    """One row's logits with the penalties applied from the full token lists."""
    expected = logits.clone()
    for t in set(tokens):
        p = params.repetition_penalty
        expected[t] = expected[t] / p if expected[t] > 0 else expected[t] * p
    for t in set(outputs):
        expected[t] -= params.frequency_penalty * outputs.count(t) + params.presence_penalty
    return expected


def processed(batch: SamplingBatch, logits: torch.Tensor) -> torch.Tensor:
    logits = logits.clone()
    for processor in batch.processors:
        logits = processor.apply(logits)
    return logits


def test_nothing_is_allocated_until_a_request_has_penalties() -> None:
    sampler = Sampler(torch.Generator().manual_seed(0))
    plain = [req(str(i), [1, 2]) for i in range(3)]
    batch = sampler.batch(plain, VOCAB, CPU)
    sampler.sample(torch.randn(3, VOCAB), batch)
    assert sampler.history is None
    assert all(r.history_row == -1 for r in plain)

    sampler.batch([req("p", [1, 2], repetition_penalty=1.2)], VOCAB, CPU)
    assert sampler.history is not None and sampler.history.num_rows == 1
    # Later requests without penalties still get no row, and nothing grows for them.
    sampler.batch(plain, VOCAB, CPU)
    assert sampler.history.num_rows == 1 and all(r.history_row == -1 for r in plain)


def test_a_new_row_holds_prompt_and_outputs() -> None:
    history = TokenHistory(VOCAB, CPU)
    r = req("a", [3, 4, 4], out=[4, 5, 5, 9])
    rows = history.rows_for([r], None)
    assert history.seen[r.history_row].nonzero().flatten().tolist() == [3, 4, 5, 9]
    counts = torch.zeros(VOCAB)
    counts[[4, 5, 9]] = torch.tensor([1.0, 2.0, 1.0])
    torch.testing.assert_close(rows.counts()[0], counts)


def test_the_next_step_sees_the_token_still_in_flight() -> None:
    """Step 2 is built before the host has step 1's id (num_in_flight = 1, the host lists lack
    it): its penalties must count that id all the same."""
    params = dict(repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.75)
    r = req("r", [3, 4], **params)
    other = req("o", [7])  # no penalties: its row must stay untouched
    sampler = Sampler(torch.Generator().manual_seed(0))
    first = torch.randn(2, VOCAB)
    first[0, 11] = 100.0  # step 1 samples 11 for r
    sample = sampler.sample(first.clone(), sampler.batch([r, other], VOCAB, CPU))
    assert sample.to_host().token_ids[0] == 11
    r.num_in_flight = 1  # sampled on the device, not on the host yet

    second = torch.randn(2, VOCAB)
    out = processed(sampler.batch([other, r], VOCAB, CPU), second)
    torch.testing.assert_close(out[0], second[0])
    torch.testing.assert_close(out[1], defined(second[1], [3, 4, 11], [11], r.params))

    # The host lists, once the id lands, give the same history from scratch.
    r.num_in_flight, r.output_token_ids = 0, [11]
    fresh = SamplingBatch.from_requests([other, r], VOCAB, CPU)
    torch.testing.assert_close(processed(fresh, second), out)


def test_repeated_tokens_are_counted_once_per_step() -> None:
    r = req("r", [1], frequency_penalty=1.0)
    sampler = Sampler(torch.Generator().manual_seed(0))
    logits = torch.zeros(1, VOCAB)
    logits[0, 6] = 100.0
    for _ in range(3):
        sampler.sample(logits.clone(), sampler.batch([r], VOCAB, CPU))
        r.num_in_flight += 1
    assert sampler.history is not None
    assert sampler.history.counts[r.history_row, 6].item() == 3.0
    assert sampler.history.counts[r.history_row].sum().item() == 3.0


def test_rows_are_reused_and_reinitialised() -> None:
    history = TokenHistory(VOCAB, CPU)
    a, b, c = (req(x, [i + 1], out=[i + 10]) for i, x in enumerate("abc"))
    history.rows_for([a, b, c], None)
    assert history.num_rows == history.num_held == 3
    row = b.history_row
    history.free(b)
    assert b.history_row == -1 and history.num_held == 2
    d = req("d", [20], out=[21, 21])
    rows = history.rows_for([d], None)
    assert d.history_row == row and history.num_rows == 3
    assert history.seen[row].nonzero().flatten().tolist() == [20, 21]
    assert rows.counts()[0].sum().item() == 2.0
    # a and c kept theirs.
    assert history.seen[a.history_row].nonzero().flatten().tolist() == [1, 10]
    assert history.seen[c.history_row].nonzero().flatten().tolist() == [3, 12]


def test_growth_keeps_the_rows_already_held() -> None:
    history = TokenHistory(VOCAB, CPU)
    a = req("a", [2], out=[3])
    rows = history.rows_for([a], None)
    rows.append(torch.tensor([8]))
    history.rows_for([req(str(i), [4]) for i in range(5)], None)
    assert history.num_rows >= 6
    assert history.seen[a.history_row].nonzero().flatten().tolist() == [2, 3, 8]
    assert history.counts[a.history_row, [3, 8]].tolist() == [1.0, 1.0]


def test_a_row_number_alone_is_not_trusted() -> None:
    """A request whose row number belongs to another history (or was given back) gets a row
    of its own, initialised from its host lists, instead of reading a stranger's."""
    first, second = TokenHistory(VOCAB, CPU), TokenHistory(VOCAB, CPU)
    stranger = req("s", [30, 31])
    second.rows_for([stranger], None)
    r = req("r", [5])
    first.rows_for([r], None)
    assert r.history_row == stranger.history_row == 0
    assert not second.holds(r)
    second.rows_for([r], None)
    assert second.seen[r.history_row].nonzero().flatten().tolist() == [5]
    assert second.seen[stranger.history_row].nonzero().flatten().tolist() == [30, 31]


def test_a_row_is_never_made_with_tokens_in_flight() -> None:
    r = req("r", [1], out=[2])
    r.num_in_flight = 1
    with pytest.raises(RuntimeError, match="in flight"):
        TokenHistory(VOCAB, CPU).rows_for([r], None)


def test_min_tokens_counts_the_tokens_in_flight() -> None:
    """min_tokens bans EOS while fewer tokens were sampled, whether the host has them yet."""
    logits = torch.zeros(1, VOCAB)
    logits[0, 0] = 10.0  # eos
    r = req("m", [1], out=[5], min_tokens=2)
    r.num_in_flight = 1  # its second token is being sampled: this step draws the third
    assert processed(SamplingBatch.from_requests([r], VOCAB, CPU), logits)[0, 0] == 10.0
    r.output_token_ids, r.num_in_flight = [], 1  # this step draws the second: banned
    assert processed(SamplingBatch.from_requests([r], VOCAB, CPU), logits)[0, 0] == float("-inf")
