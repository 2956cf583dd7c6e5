"""Speculative decoding in the engine (n-gram prompt lookup): greedy output token for token as
without it, on the default model, with chunked prefill and preemption forced, stop strings and
max_tokens landing inside a proposal, sampled requests in the same steps, and every KV block
back at the end.

Copy-heavy prompts (repeat, continue a list) make the lookup propose, and the test asserts
that proposals were made and accepted, so the verify path is what ran.
"""

from __future__ import annotations

from typing import Any

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.backend.engine.request import Request

PASSAGES = [
    "the quick brown fox jumps over the lazy dog and runs into the forest",
    "one, two, three, four, five, six, seven, eight, nine, ten",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n",
]
# 16 requests: each passage asked to be repeated, continued or copied, with max_tokens that end
# mid-proposal (odd counts) and stop strings that occur inside the copied text.
REQUESTS: list[tuple[str, dict[str, Any]]] = []
for i, passage in enumerate(PASSAGES):
    REQUESTS += [
        (f"Repeat this text three times: {passage}\n", {"max_tokens": 41 + i}),
        (f"Copy exactly: {passage}\nCopy: {passage}\nCopy:", {"max_tokens": 13 + 2 * i}),
        (f"{passage}\n{passage}\n", {"max_tokens": 30, "stop": [passage.split()[3]]}),
        (f"Continue: {passage}, {passage},", {"max_tokens": 7 + i}),
    ]
BLOCKS = 16  # the 16 requests need about 60 at once: preemption is forced
ENGINE = dict(device="cpu", num_blocks=BLOCKS, block_size=16, max_num_batched_tokens=64)


def run(llm: LLM, extra: list[SamplingParams] = ()) -> tuple[list[Request], list[Request]]:
    """Every request submitted at once, the engine stepped to the end; the greedy requests,
    then the ``extra`` ones (same prompt as the first), finished."""
    engine = llm.engine
    greedy = [
        engine.builder.build(prompt=prompt, params=SamplingParams(temperature=0.0, **kw))
        for prompt, kw in REQUESTS
    ]
    others = [engine.builder.build(prompt=REQUESTS[0][0], params=p) for p in extra]
    for request in greedy + others:
        engine.add(request)
    while engine.has_unfinished():
        engine.step()
    assert engine.block_manager.num_free_blocks == BLOCKS
    return greedy, others


@pytest.fixture(scope="module")
def baseline(default_model_dir: Any) -> LLM:
    return LLM(**ENGINE)


@pytest.fixture(scope="module")
def speculative(default_model_dir: Any) -> LLM:
    return LLM(**ENGINE, speculative_method="ngram", num_speculative_tokens=4)


def test_greedy_output_is_token_for_token_without_speculation(
    baseline: LLM, speculative: LLM
) -> None:
    sampled = [SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=24)]
    want, want_sampled = run(baseline, sampled)
    got, got_sampled = run(speculative, sampled)
    assert speculative.engine.scheduler.num_preemptions > 0, "the pool was meant to preempt"
    assert not speculative.engine.overlap
    for a, b in zip(want, got):
        assert b.output_token_ids == a.output_token_ids, b.prompt_token_ids
        assert b.finish_reason == a.finish_reason
    # A seeded sampled request in the same steps draws the same tokens (it never speculates).
    assert got_sampled[0].output_token_ids == want_sampled[0].output_token_ids
    assert got_sampled[0].num_draft_tokens == 0
    drafted = sum(r.num_draft_tokens for r in got)
    accepted = sum(r.num_accepted_tokens for r in got)
    assert drafted > 0 and 0 < accepted <= drafted, (drafted, accepted)
    # Stops and max_tokens inside a proposal: the stopped requests end where the baseline's do.
    assert {r.finish_reason.value for r in got} >= {"stop", "length"}
    assert all(r.num_draft_tokens == 0 for r in want)


def test_the_speculative_config_flag_sets_the_engine_options() -> None:
    from pagedserve.backend.cli import build_parser, engine_config_from_args

    args = build_parser().parse_args([
        "serve", "--device", "cpu", "--speculative-config",
        '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 4}',
    ])
    spec = engine_config_from_args(args).speculative
    assert (spec.speculative_method, spec.num_speculative_tokens) == ("ngram", 3)
    assert (spec.prompt_lookup_min, spec.prompt_lookup_max) == (1, 4)
    flags = build_parser().parse_args(
        ["serve", "--device", "cpu", "--speculative-method", "ngram", "--num-speculative-tokens", "2"]
    )
    assert engine_config_from_args(flags).speculative.num_speculative_tokens == 2


@pytest.mark.parametrize(
    "text,error",
    [
        ("{not json", "not JSON"),
        ("[1]", "must be a JSON object"),
        ('{"method": "eagle"}', "method must be one of ngram"),
        ('{"method": "ngram", "k": 4}', "unknown keys k"),
        ('{"method": "ngram", "num_speculative_tokens": 0}', "must be a positive integer"),
    ],
)
def test_a_bad_speculative_config_is_one_clear_error(
    text: str, error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from pagedserve.backend.cli import build_parser

    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["serve", "--speculative-config", text])
    assert info.value.code == 2
    assert error in capsys.readouterr().err


def test_bad_speculative_options_fail_at_load() -> None:
    from pagedserve.backend.config import SpeculativeConfig
    from pagedserve.backend.spec_decode.proposer import build_proposer

    assert build_proposer(SpeculativeConfig()) is None
    with pytest.raises(ValueError, match="speculative method must be one of ngram"):
        build_proposer(SpeculativeConfig(speculative_method="eagle"))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prompt_lookup_min <= prompt_lookup_max"):
        build_proposer(SpeculativeConfig("ngram", prompt_lookup_min=3, prompt_lookup_max=2))
