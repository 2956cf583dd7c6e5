"""Overlapped scheduling: queuing step N+1 before step N's ids reach the host changes nothing
a client can see.

The CPU runs the same code path as CUDA (the sampled ids of the step still "in flight" feed the
next step's inputs on the device side), it just gains no time from it. Every test runs the same
workload with overlap off and on and requires identical results, under preemption, chunked
prefill, early stops, seeds, logprobs and aborts.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.backend.cli import build_parser, engine_config_from_args
from pagedserve.backend.engine.request import RequestOutput
from pagedserve.backend.engine.core import EngineCore

# Small enough to force preemption (96 blocks of 4 tokens for ~1,000 live tokens) and chunked
# prefill (a 64-token budget against prompts of up to 150 tokens).
ENGINE_ARGS = dict(device="cpu", block_size=4, num_blocks=96, max_num_batched_tokens=64, max_num_seqs=8)


@pytest.fixture(scope="module")
def engines(tiny_llama_dir) -> Iterator[dict[bool, LLM]]:
    yield {
        overlap: LLM(str(tiny_llama_dir), overlap_scheduling=overlap, **ENGINE_ARGS)
        for overlap in (False, True)
    }


@pytest.fixture(autouse=True)
def all_blocks_free_after(engines: dict[bool, LLM]) -> Iterator[None]:
    yield
    for llm in engines.values():
        bm = llm.engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks, "a test left KV blocks allocated"
        assert not llm.engine.requests


def prompts() -> list[list[int]]:
    lengths = [1, 5, 17, 33, 64, 65, 100, 150, 3, 48]
    return [[(7 * i + 13 * n) % 40000 + 100 for i in range(n)] for n in lengths]


def mixed_params(stop_token: int) -> list[SamplingParams]:
    return [
        SamplingParams(max_tokens=1, temperature=0.0),
        SamplingParams(max_tokens=2, temperature=0.0, logprobs=3),
        SamplingParams(max_tokens=40, temperature=0.0),
        SamplingParams(max_tokens=30, temperature=0.8, top_p=0.9, seed=1),
        SamplingParams(max_tokens=25, temperature=1.0, top_k=20, seed=2, logprobs=1),
        SamplingParams(max_tokens=40, temperature=0.0, stop_token_ids=[stop_token]),
        SamplingParams(max_tokens=12, temperature=0.0),
        SamplingParams(max_tokens=35, temperature=0.7, min_p=0.05, seed=3),
        SamplingParams(max_tokens=20, temperature=0.0, stop=["e"]),
        SamplingParams(max_tokens=33, temperature=0.0),
    ]


def summary(outputs: list[RequestOutput]) -> list[tuple]:
    return [
        (
            o.token_ids,
            o.text,
            o.finish_reason,
            o.stop_reason,
            o.usage,
            None if o.logprobs is None else [(lp.token_id, round(lp.logprob, 4), [t for t, _ in lp.top]) for lp in o.logprobs],
        )
        for o in outputs
    ]


def count_overlapped_launches(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record, per launch, whether it was queued behind a step still in flight."""
    record: list[bool] = []
    launch = EngineCore._launch

    def spy(self: EngineCore):  # type: ignore[no-untyped-def]
        record.append(self._in_flight is not None)
        return launch(self)

    monkeypatch.setattr(EngineCore, "_launch", spy)
    return record


def test_mixed_batch_identical_with_and_without_overlap(engines, monkeypatch) -> None:
    # A token the greedy runs produce early, so one request stops on it mid-batch. Both engines
    # run the probe, so their prefix caches stay alike.
    probe = SamplingParams(max_tokens=8, temperature=0.0)
    stop_token = {
        llm.generate(prompt_token_ids=[prompts()[5]], sampling_params=probe)[0].token_ids[3]
        for llm in engines.values()
    }.pop()
    params = mixed_params(stop_token)

    plain = engines[False].generate(prompt_token_ids=prompts(), sampling_params=params)
    launches = count_overlapped_launches(monkeypatch)
    preempted_before = engines[True].engine.scheduler.num_preemptions
    overlapped = engines[True].generate(prompt_token_ids=prompts(), sampling_params=params)

    assert summary(overlapped) == summary(plain)
    assert plain[5].stop_reason == stop_token, "the stop-token request must stop early"
    assert sum(launches) > len(launches) // 2, "most steps must be queued behind the previous one"
    assert engines[True].engine.scheduler.num_preemptions > preempted_before, "preemption not exercised"


def test_penalties_and_min_tokens_overlap_too(engines, monkeypatch) -> None:
    """They read the device's token history and the host's token count, not the host's ids:
    their steps are queued behind the previous one like any other."""
    batch = prompts()[2:6]
    # min_tokens ends exactly where the stop token comes first: allowed there, and only there
    # (a step that lost count of the token in flight would still ban it). Both engines run the
    # probe, so their prefix caches stay alike.
    greedy = SamplingParams(max_tokens=20, temperature=0.0)
    (probe,) = {
        tuple(llm.generate(prompt_token_ids=[batch[1]], sampling_params=greedy)[0].token_ids)
        for llm in engines.values()
    }
    first = next(k for k in range(3, 20) if probe[k] not in probe[:k])
    params = [
        SamplingParams(max_tokens=20, temperature=0.0, repetition_penalty=1.3),
        SamplingParams(max_tokens=20, temperature=0.0, min_tokens=first, stop_token_ids=[probe[first]]),
        SamplingParams(max_tokens=20, temperature=0.0, frequency_penalty=0.5, presence_penalty=0.5),
        SamplingParams(max_tokens=20, temperature=0.8, seed=4, repetition_penalty=0.9,
                       frequency_penalty=-0.5, min_tokens=5),
    ]
    plain = engines[False].generate(prompt_token_ids=batch, sampling_params=params)
    launches = count_overlapped_launches(monkeypatch)
    overlapped = engines[True].generate(prompt_token_ids=batch, sampling_params=params)
    assert summary(overlapped) == summary(plain)
    assert plain[1].token_ids == list(probe[: first + 1]) and plain[1].stop_reason == probe[first]
    assert sum(launches) > len(launches) // 2, "most steps must be queued behind the previous one"


def test_abort_while_in_flight_leaves_the_rest_unchanged(engines) -> None:
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    batch = prompts()[:6]
    results: dict[bool, dict[str, list[int]]] = {}
    for overlap, llm in engines.items():
        engine = llm.engine
        requests = [engine.builder.build(prompt_token_ids=p, params=greedy) for p in batch]
        for r in requests:
            engine.add(r)
        tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
        victim = requests[2]
        finished: set[str] = set()
        steps = 0
        while len(finished) < len(requests):
            for delta in engine.step():
                tokens[delta.request_id] += delta.token_ids
                if delta.finished:
                    finished.add(delta.request_id)
            steps += 1
            if steps == 6:  # mid-decode; with overlap its next step is already queued
                assert engine.abort(victim.request_id) is not None
                finished.add(victim.request_id)
        while engine.step():  # a step queued for finished requests is drained, not lost
            pass
        results[overlap] = {str(i): tokens[r.request_id] for i, r in enumerate(requests)}
    victim_plain, victim_overlap = results[False].pop("2"), results[True].pop("2")
    assert results[True] == results[False]
    assert 0 < len(victim_overlap) < 24 and 0 < len(victim_plain) < 24


@pytest.mark.parametrize(
    ("flags", "expected"),
    [([], None), (["--overlap-scheduling"], True), (["--no-overlap-scheduling"], False)],
)
def test_command_line_flag_reaches_the_config(flags: list[str], expected: bool | None) -> None:
    args = build_parser().parse_args(["bench", "offline", *flags])
    assert engine_config_from_args(args).overlap_scheduling is expected


def test_default_is_off_on_the_cpu(engines) -> None:
    default = LLM(str(engines[True].engine.config.model.model), device="cpu", num_blocks=8)
    assert default.engine.overlap is False
    assert engines[True].engine.overlap is True
