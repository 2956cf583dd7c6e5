"""Penalties through the whole engine with overlapped scheduling on: greedy tokens equal those of
a plain reference loop that applies each penalty from the request's full token list at every
step, across preemption too; and the device history's rows go back as requests finish.

With overlap, every step is built before the host has the previous step's token: a history
missing that token would penalise it one step late and pick other tokens than the reference.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pagedserve import LLM, SamplingParams
from pagedserve.backend.engine.core import EngineCore
from pagedserve.backend.engine.request import Request
from pagedserve.backend.engine.scheduler import Scheduler
from pagedserve.backend.runner.token_history import TokenHistory
from tests.backend.engine.reference import ReferenceOutput, compare_greedy

MAX_TOKENS = 24
# Four sequences of up to 23 + 24 tokens need up to 48 blocks of 4; 36 force preemption.
TIGHT = dict(device="cpu", dtype="float32", block_size=4, num_blocks=36,
             max_num_batched_tokens=32, max_num_seqs=4, overlap_scheduling=True)
ROOMY = {**TIGHT, "num_blocks": 512}

# Prompts on which the tiny Llama's plain greedy decoding falls into loops (one token again and
# again, or two in turn), its own tokens or the prompt's: exactly what the penalties break.
PROMPTS = [
    [25620] * 20,
    [25620] * 20 + [8877] * 3,  # the loop's token is in the prompt: repetition_penalty sees it
    [8877] * 10,
    [36189] * 8,
    [12762, 14346, 27174, 34006, 25620] * 4,
    [1829] * 6,
    [8026] * 12,
    [36189, 8877] * 6,
]
PENALTIES = [
    dict(repetition_penalty=1.4),
    dict(presence_penalty=0.8, frequency_penalty=0.6),
    dict(repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=1.0),
    dict(repetition_penalty=0.8, frequency_penalty=-0.4),  # rewarding repeats
    dict(),  # shares batches with the others: penalties must leave it alone
    dict(presence_penalty=2.0),
    dict(frequency_penalty=0.3),
    dict(repetition_penalty=1.5, presence_penalty=-0.5),
]


def greedy(**penalties: float) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, **penalties)


def penalised(logits: torch.Tensor, tokens: list[int], outputs: list[int], p: SamplingParams) -> torch.Tensor:
    """The penalties' definitions, from the full token lists."""
    logits = logits.clone()
    for t in set(tokens):
        if logits[t] > 0:
            logits[t] /= p.repetition_penalty
        else:
            logits[t] *= p.repetition_penalty
    for t in set(outputs):
        logits[t] -= p.frequency_penalty * outputs.count(t) + p.presence_penalty
    return logits


def reference(model, prompt: list[int], p: SamplingParams) -> ReferenceOutput:
    """Greedy decoding one token at a time over the whole sequence, penalties applied fresh."""
    outputs: list[int] = []
    gaps: list[float] = []
    with torch.inference_mode():
        for _ in range(p.max_tokens):
            tokens = prompt + outputs
            logits = model(torch.tensor([tokens])).logits[0, -1].float()
            logits = penalised(logits, tokens, outputs, p)
            top2 = logits.topk(2).values
            gaps.append(float(top2[0] - top2[1]))
            outputs.append(int(logits.argmax()))
    return ReferenceOutput(outputs, gaps)


def record_launches(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Per launch, whether it was queued behind a step still in flight."""
    record: list[bool] = []
    launch = EngineCore._launch

    def spy(self: EngineCore):  # type: ignore[no-untyped-def]
        record.append(self._in_flight is not None)
        return launch(self)

    monkeypatch.setattr(EngineCore, "_launch", spy)
    return record


def record_preemptions(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bool, int, int]]:
    """Per preemption: whether the request has penalties, its outputs and tokens in flight."""
    record: list[tuple[bool, int, int]] = []
    preempt = Scheduler._preempt

    def spy(self: Scheduler, req: Request) -> None:
        record.append((req.params.has_penalties, len(req.output_token_ids), req.num_in_flight))
        preempt(self, req)

    monkeypatch.setattr(Scheduler, "_preempt", spy)
    return record


def history(llm: LLM) -> TokenHistory:
    h = llm.engine.runner.sampler.history
    assert h is not None
    return h


@pytest.fixture(scope="module")
def hf_model(tiny_llama_dir: Path):  # type: ignore[no-untyped-def]
    return AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tight(tiny_llama_dir: Path) -> Iterator[LLM]:
    with LLM(str(tiny_llama_dir), **TIGHT) as llm:
        yield llm


def test_penalties_match_a_reference_loop_with_overlap_and_preemption(
    tight: LLM, hf_model, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    batch = PROMPTS
    params = [greedy(**p) for p in PENALTIES]
    launches = record_launches(monkeypatch)
    preemptions = record_preemptions(monkeypatch)
    outs = tight.generate(prompt_token_ids=batch, sampling_params=params)

    refs = [reference(hf_model, prompt, p) for prompt, p in zip(batch, params)]
    ties = compare_greedy([o.token_ids for o in outs], refs)
    assert ties <= 1
    assert sum(launches) > len(launches) * 3 // 4, "most steps must be queued behind the previous one"
    assert any(has and out > 0 for has, out, _ in preemptions), "no penalised request was preempted mid-decode"
    # Without penalties the same prompts decode otherwise: the comparison above tests them.
    plain = tight.generate(prompt_token_ids=batch, sampling_params=greedy())
    for i, p in enumerate(PENALTIES):
        assert (outs[i].token_ids == plain[i].token_ids) == (not p), f"request {i}: {p}"
    assert history(tight).num_held == 0


def test_history_rows_go_back_and_are_reused(tiny_llama_dir: Path) -> None:
    with LLM(str(tiny_llama_dir), **ROOMY) as llm:
        batch = [PROMPTS[i % len(PROMPTS)] for i in range(16)]
        params = [
            SamplingParams(max_tokens=6, temperature=0.0, **PENALTIES[i % 4]) for i in range(16)
        ]
        llm.generate(prompt_token_ids=batch, sampling_params=params)
        assert llm.engine.scheduler.num_preemptions == 0
        h = history(llm)
        # Never more rows than requests live at once (max_num_seqs), none held at the end.
        assert 0 < h.num_rows <= TIGHT["max_num_seqs"]
        assert h.num_held == 0

        # An aborted request gives its row back too, even with a step of it still queued.
        engine = llm.engine
        r = engine.builder.build(prompt_token_ids=batch[0], params=params[0])
        engine.add(r)
        while r.history_row < 0:
            engine.step()
        assert h.num_held == 1
        assert engine.abort(r.request_id) is not None
        assert h.num_held == 0 and r.history_row == -1
        while engine.has_unfinished():  # the step still queued for it is drained
            engine.step()
        assert h.num_held == 0
