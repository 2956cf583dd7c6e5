"""Scheduler: token budget, chunked prefill mixed with decodes, preemption order, admission."""

from __future__ import annotations

from pagedserve.backend.config import SchedulerConfig
from pagedserve.backend.engine.block_manager import BlockManager
from pagedserve.backend.engine.request import Request, RequestStatus
from pagedserve.backend.engine.scheduler import Scheduler, SchedulerOutput
from pagedserve.backend.sampling_params import SamplingParams


def make(rid: str, n: int, max_tokens: int = 8) -> Request:
    return Request(rid, [rid.__hash__() % 1000 + i for i in range(n)], SamplingParams(max_tokens=max_tokens))


def manager(num_blocks: int, block_size: int, **kwargs) -> BlockManager:
    return BlockManager(num_blocks, block_size, max_seqs=8, max_blocks_per_seq=64, **kwargs)


def run_step(sched: Scheduler, out: SchedulerOutput, token: int = 5) -> None:
    """A step through the scheduler's own bookkeeping, as the engine core runs it: launched,
    then landed with one sampled token (``token``) per request the step samples for."""
    computed_after = sched.launched(out)
    sched.landed(out, computed_after)
    for req in out.samplers:
        req.output_token_ids.append(token)  # what output processing records


def test_budget_chunks_prefill_and_mixes_decodes() -> None:
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=8), manager(64, 4))
    a = make("a", 10)
    sched.add_request(a)
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 10)]
    run_step(sched, out)
    b = make("b", 40)
    sched.add_request(b)
    out = sched.schedule()
    # a decodes (1 token), b's prefill gets the remaining 15 of the budget.
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 15)]
    assert out.scheduled[0].samples and not out.scheduled[1].samples
    run_step(sched, out)
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 15)]
    run_step(sched, out)
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 1), ("b", 10)]
    assert out.scheduled[1].samples


def test_max_num_seqs_limits_admission() -> None:
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=100, max_num_seqs=2), manager(64, 4))
    for rid in "abc":
        sched.add_request(make(rid, 4))
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["a", "b"]
    assert [r.request_id for r in sched.waiting] == ["c"]


def test_preempts_newest_and_resumes_it_before_new_arrivals() -> None:
    # 6 blocks of 4 tokens. a and b take 2 blocks each for their prompts (8 tokens).
    bm = manager(6, 4, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8), bm)
    a, b = make("a", 8), make("b", 8)
    sched.add_request(a)
    sched.add_request(b)
    run_step(sched, sched.schedule())
    assert bm.num_free_blocks == 2
    # Decodes: each needs a third block (token 9). Both fit (2 free).
    run_step(sched, sched.schedule())
    assert bm.num_free_blocks == 0
    new = make("c", 4)
    sched.add_request(new)
    for _ in range(3):  # tokens 10..12 fit in the third blocks
        out = sched.schedule()
        assert not out.preempted
        run_step(sched, out)
    out = sched.schedule()  # token 13 needs a fourth block each: b (newest) is preempted
    assert [r.request_id for r in out.preempted] == ["b"]
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0 and b.block_ids == []
    assert [r.request_id for r in sched.waiting] == ["b", "c"]  # ahead of the new arrival
    assert [s.request.request_id for s in out.scheduled] == ["a"]


def test_finish_frees_blocks_from_anywhere() -> None:
    bm = manager(16, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=1), bm)
    a, b = make("a", 5), make("b", 5)
    sched.add_request(a)
    sched.add_request(b)
    sched.schedule()
    sched.finish(a)
    sched.finish(b)  # still waiting
    assert bm.num_free_blocks == 16 and not sched.running and not sched.waiting


def test_launch_counts_tokens_computed_and_in_flight_until_they_land() -> None:
    """Overlapped scheduling's bookkeeping: a launched decode is in flight, the next schedule
    counts its token as known, and landing clears it."""
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8), manager(16, 4))
    a = make("a", 6, max_tokens=2)
    sched.add_request(a)
    first = sched.schedule()
    first_after = sched.launched(first)
    assert (a.num_computed_tokens, a.num_in_flight) == (6, 1) and first_after == [6]
    second = sched.schedule()  # scheduled while the first step's token is in flight
    assert [(s.request.request_id, s.num_new_tokens, s.samples) for s in second.scheduled] == [("a", 1, True)]
    second_after = sched.launched(second)
    assert (a.num_computed_tokens, a.num_in_flight) == (7, 2)
    sched.landed(first, first_after)
    a.output_token_ids.append(5)
    assert a.num_in_flight == 1
    # Its second token (in flight) is its last (max_tokens=2): nothing more is scheduled for it.
    assert sched.schedule().is_empty
    sched.landed(second, second_after)
    assert a.num_in_flight == 0


def test_random_workload_never_deadlocks_and_frees_everything() -> None:
    import random

    rng = random.Random(0)
    bm = manager(12, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=10, max_num_seqs=4), bm)
    reqs = [make(f"r{i}", rng.randint(1, 20), max_tokens=rng.randint(1, 12)) for i in range(20)]
    for r in reqs:
        sched.add_request(r)
    for _ in range(2000):
        if not sched.num_unfinished:
            break
        out = sched.schedule()
        assert not out.is_empty, "a step with unfinished work scheduled nothing"
        run_step(sched, out)
        for r in list(sched.running):
            if len(r.output_token_ids) >= r.params.max_tokens:
                sched.finish(r)
    assert sched.num_unfinished == 0
    assert bm.num_free_blocks == 12
    assert all(len(r.output_token_ids) == r.params.max_tokens for r in reqs)


def test_admission_group_waits_for_enough_free_slots_then_admits_together() -> None:
    """At saturation, waiting requests join in groups (one prefilling step, not one per freed
    slot), and no longer than max_admission_wait_s after they first could have."""
    config = SchedulerConfig(max_num_batched_tokens=1000, max_num_seqs=4, admission_group=3,
                             max_admission_wait_s=3600.0)
    sched = Scheduler(config, manager(256, 4))
    running = [make(f"r{i}", 4, max_tokens=100) for i in range(4)]
    for r in running:
        sched.add_request(r)
    run_step(sched, sched.schedule())
    for rid in "abcde":
        sched.add_request(make(rid, 4))

    def admitted() -> list[str]:
        """The waiting requests the next step admits."""
        waiting = {r.request_id for r in sched.waiting}
        out = sched.schedule()
        run_step(sched, out)
        return [s.request.request_id for s in out.scheduled if s.request.request_id in waiting]

    for n_finished in (1, 2):
        sched.finish(running[n_finished - 1])
        assert admitted() == [], f"{n_finished} free slots of a group of 3: none joins yet"
    sched.finish(running[2])
    assert admitted() == ["a", "b", "c"]

    # With one slot free and the wait over, the next one joins alone.
    sched.config.max_admission_wait_s = 0.0
    sched.finish(running[3])
    assert admitted() == ["d"]


def test_admission_group_never_holds_back_a_preempted_request() -> None:
    config = SchedulerConfig(max_num_batched_tokens=1000, max_num_seqs=4, admission_group=3,
                             max_admission_wait_s=3600.0)
    sched = Scheduler(config, manager(256, 4))
    for i in range(4):
        sched.add_request(make(f"r{i}", 4, max_tokens=100))
    run_step(sched, sched.schedule())
    for rid in "abcde":
        sched.add_request(make(rid, 4))
    victim = sched.running.pop()
    sched._preempt(victim)  # as a step short of blocks does
    out = sched.schedule()
    assert [s.request for s in out.scheduled if s.request.status is RequestStatus.RUNNING][-1] is victim
    assert [r.request_id for r in sched.waiting] == list("abcde")


# -- choices sharing a prompt (parallel sampling) ---------------------------------------------
def choice_of(source: Request, rid: str) -> Request:
    req = Request(rid, list(source.prompt_token_ids), SamplingParams(max_tokens=8))
    req.prompt_source = source
    return req


def test_choices_wait_for_their_source_then_map_its_full_prompt_blocks() -> None:
    bm = manager(64, 4, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=8, max_num_seqs=8), bm)
    source = make("s", 18)  # 4 full shareable blocks (16 tokens) + 2 tokens
    sched.add_request(source)
    choices = [choice_of(source, f"s-{i}") for i in (1, 2)]
    for choice in choices:
        sched.add_request(choice)
    late = make("late", 4)
    sched.add_request(late)
    assert sched.num_waiting == 4 and sched.num_unfinished == 4

    out = sched.schedule()  # the source's first chunk: 8 of its 16 shareable tokens
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("s", 8)]
    run_step(sched, out)
    out = sched.schedule()  # its second chunk: the choices still wait (only 16 computed after it)
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("s", 8)]
    assert sched.held == choices
    run_step(sched, out)
    out = sched.schedule()  # 16 computed: the choices go first, ahead of "late", 2 tokens each
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [
        ("s", 2), ("s-1", 2), ("s-2", 2), ("late", 2)
    ]
    shared = source.block_ids[:4]
    for choice in choices:
        assert choice.block_ids[:4] == shared and choice.block_ids[4] != source.block_ids[4]
        assert choice.num_cached_prompt_tokens == 16
    assert [bm.blocks[b].ref_count for b in shared] == [3] * 4
    # 5 blocks for the source, 1 more for each choice, 1 for "late": none of the prompt twice.
    assert bm.num_blocks - bm.num_free_blocks == 5 + 2 + 1
    for choice in choices:
        sched.finish(choice)
    sched.finish(source)
    assert [bm.blocks[b].ref_count for b in shared] == [0] * 4


def test_a_choice_whose_source_ends_first_is_admitted_on_its_own() -> None:
    bm = manager(64, 4, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=8, max_num_seqs=8), bm)
    source = make("s", 18)
    sched.add_request(source)
    choice = choice_of(source, "s-1")
    sched.add_request(choice)
    run_step(sched, sched.schedule())
    sched.finish(source)  # aborted mid-prefill
    out = sched.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in out.scheduled] == [("s-1", 8)]
    assert choice.prompt_source is None and not sched.held


def test_a_prompt_within_one_block_is_not_held() -> None:
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8), manager(64, 4))
    source = make("s", 4)  # its only full block holds the last prompt token: nothing to share
    sched.add_request(source)
    choice = choice_of(source, "s-1")
    sched.add_request(choice)
    assert not sched.held
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["s", "s-1"]


def test_an_aborted_held_choice_leaves_the_scheduler() -> None:
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=8, max_num_seqs=8), manager(64, 4))
    source = make("s", 18)
    sched.add_request(source)
    choice = choice_of(source, "s-1")
    sched.add_request(choice)
    sched.finish(choice)
    assert not sched.held and sched.num_unfinished == 1
