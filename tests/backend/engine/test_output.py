"""Incremental detokenization and stopping, on the default model's real tokenizer."""

from __future__ import annotations

import dataclasses
import random

import pytest
from transformers import AutoTokenizer

from pagedserve.backend.engine.output import IncrementalDetokenizer, OutputProcessor
from pagedserve.backend.engine.request import (
    FinishReason,
    Request,
    RequestOutputDelta,
    RequestTimes,
    TokenLogprob,
    Usage,
)
from pagedserve.backend.sampling_params import SamplingParams

EOS = 2


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir)


def feed(tokenizer, token_ids: list[int], **params):
    proc = OutputProcessor(tokenizer, max_model_len=10_000)
    params.setdefault("max_tokens", 1000)
    request = Request("r", [1], SamplingParams(**params), eos_token_ids=frozenset({EOS}))
    proc.start(request)
    deltas = []
    for t in token_ids:
        deltas.append(proc.process_token(request, t, None))
        if deltas[-1].finished:
            break
    return request, deltas


@pytest.mark.parametrize(
    "text",
    ["Hello 世界, how are you? 🌍🚀👩‍👩‍👧 done", "日本語のテキストと絵文字 😀😃😄 mixed with English.", "naïve café — “quotes” ½"],
)
def test_deltas_join_to_the_full_decode_without_broken_characters(tokenizer, text) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    request, deltas = feed(tokenizer, ids, max_tokens=len(ids))
    assert deltas[-1].finished and deltas[-1].finish_reason is FinishReason.LENGTH
    assert all("\ufffd" not in d.text for d in deltas)
    assert "".join(d.text for d in deltas) == tokenizer.decode(ids, skip_special_tokens=True) == text
    # Multi-byte characters span several byte-level tokens: some steps must emit nothing.
    assert any(d.text == "" for d in deltas)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_rust_incremental_decoding_gives_the_same_deltas_as_the_window_decode(
    tokenizer, skip_special_tokens
) -> None:
    """The tokenizer's DecodeStream path against our two-decode window algorithm, token by
    token: real text (multi-byte characters), random ids, special ids and ids past the
    vocabulary (a padded LM head can sample them)."""
    rng = random.Random(3)
    vocab = len(tokenizer)
    sequences = [
        tokenizer.encode("Hello 世界 🌍🚀👩‍👩‍👧, naïve café ½ 日本語", add_special_tokens=False),
        [rng.randrange(vocab) for _ in range(300)],
        [rng.choice([0, 1, 2, vocab, vocab + 7, rng.randrange(vocab)]) for _ in range(200)],
    ]
    for ids in sequences:
        fast = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        window = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        assert fast._stream is not None
        window._stream = None
        assert [fast.add(t) for t in ids] == [window.add(t) for t in ids]
        assert fast.flush() == window.flush()


def test_stop_string_across_tokens_is_excluded_and_never_streamed(tokenizer) -> None:
    text = "The answer is forty-two. Done here."
    ids = tokenizer.encode(text, add_special_tokens=False)
    _, deltas = feed(tokenizer, ids, stop=["two. Do"])
    out = "".join(d.text for d in deltas)
    assert out == "The answer is forty-"
    assert deltas[-1].finish_reason is FinishReason.STOP and deltas[-1].stop_reason == "two. Do"
    for d in deltas[:-1]:  # nothing before the end ever showed a piece of the stop string
        assert "two" not in d.text


def test_text_state_stays_bounded_over_a_long_generation(tokenizer) -> None:
    """Between tokens only the unsent tail is kept (at most the longest stop string minus one
    character), so a token costs the same however long the output has grown."""
    rng = random.Random(5)
    ids = [rng.randrange(1000, 40000) for _ in range(3000)]
    stop = "<never seen>"
    proc = OutputProcessor(tokenizer, max_model_len=10_000)
    params = SamplingParams(max_tokens=len(ids), stop=[stop])
    request = Request("r", [1], params, eos_token_ids=frozenset({EOS}))
    proc.start(request)
    deltas = []
    for t in ids:
        deltas.append(proc.process_token(request, t, None))
        assert request.output is not None and len(request.output.pending) <= len(stop) - 1
    assert deltas[-1].finish_reason is FinishReason.LENGTH
    assert "".join(d.text for d in deltas) == tokenizer.decode(ids, skip_special_tokens=True)


def test_stop_string_included_when_asked(tokenizer) -> None:
    ids = tokenizer.encode("alpha beta gamma delta", add_special_tokens=False)
    _, deltas = feed(tokenizer, ids, stop=["gam"], include_stop_str_in_output=True)
    assert "".join(d.text for d in deltas) == "alpha beta gam"


def test_eos_and_stop_token_ids(tokenizer) -> None:
    ids = tokenizer.encode("one two", add_special_tokens=False)
    request, deltas = feed(tokenizer, ids + [EOS] + ids)
    assert deltas[-1].finish_reason is FinishReason.STOP and deltas[-1].stop_reason is None
    assert "".join(d.text for d in deltas) == "one two"
    assert request.output_token_ids == ids + [EOS]
    _, deltas = feed(tokenizer, ids + ids, stop_token_ids=[ids[1]])
    assert deltas[-1].stop_reason == ids[1] and "".join(d.text for d in deltas) == "one"


def test_ignore_eos_and_min_tokens(tokenizer) -> None:
    ids = tokenizer.encode("one two three", add_special_tokens=False)
    _, deltas = feed(tokenizer, [EOS] + ids, ignore_eos=True, max_tokens=4)
    assert deltas[-1].finish_reason is FinishReason.LENGTH and len(deltas) == 4
    _, deltas = feed(tokenizer, ids + ids, stop=["two"], min_tokens=4)
    # The first "two" comes before min_tokens outputs and is not a stop; the second is.
    assert "".join(d.text for d in deltas).count("two") == 1


def test_merged_deltas_join_text_tokens_logprobs_and_keep_the_final_fields() -> None:
    a = RequestOutputDelta("r", "Hel", [5], [TokenLogprob(5, -0.1, [])])
    b = RequestOutputDelta(
        "r", "lo", [6, 7], [TokenLogprob(6, -0.2, []), TokenLogprob(7, -0.3, [])],
        finished=True, finish_reason=FinishReason.STOP, stop_reason=7, usage=Usage(3, 3, 0),
        error="e", times=RequestTimes(arrival=1.0), num_preemptions=2, num_prefill_chunks=3,
    )
    merged = a.followed_by(b)
    assert (merged.text, merged.token_ids) == ("Hello", [5, 6, 7])
    assert [lp.token_id for lp in merged.logprobs] == [5, 6, 7]
    joined = {"text", "token_ids", "logprobs"}
    for field in dataclasses.fields(RequestOutputDelta):  # every other field: the later delta's
        if field.name not in joined:
            assert getattr(merged, field.name) == getattr(b, field.name), field.name
    assert merged.finished and merged.finish_reason is FinishReason.STOP and merged.stop_reason == 7
    assert (a.text, a.token_ids, len(a.logprobs)) == ("Hel", [5], 1)  # the parts are untouched
    assert RequestOutputDelta("r", "a", [1]).followed_by(RequestOutputDelta("r", "b", [2])).logprobs is None
