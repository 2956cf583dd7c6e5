"""The device token history behind the penalties: rows from the host lists once, then kept up
to date by the steps' sampled ids alone (the host may not have them yet), freed and reused."""

from __future__ import annotations

import pytest
import torch

from pagedserve.backend.engine.request import Request
from pagedserve.backend.runner.token_history import TokenHistory
from pagedserve.backend.sampling_params import SamplingParams

VOCAB = 50
CPU = torch.device("cpu")


def req(rid: str, prompt: list[int], out: list[int] | None = None, **kw) -> Request:
    r = Request(rid, prompt, SamplingParams(temperature=0.0, **kw), eos_token_ids=frozenset({0}))
    r.output_token_ids = list(out or [])
    return r


def test_a_new_row_holds_prompt_and_outputs() -> None:
    history = TokenHistory(VOCAB, CPU)
    r = req("a", [3, 4, 4], out=[4, 5, 5, 9])
    rows = history.rows_for([r], None)
    assert history.seen[r.history_row].nonzero().flatten().tolist() == [3, 4, 5, 9]
    counts = torch.zeros(VOCAB)
    counts[[4, 5, 9]] = torch.tensor([1.0, 2.0, 1.0])
    torch.testing.assert_close(rows.counts()[0], counts)


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