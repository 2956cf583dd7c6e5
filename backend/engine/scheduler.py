"""Continuous batching: which requests run this step, and how many tokens each.

Every step has a token budget (``max_num_batched_tokens``). Running requests go first, oldest
first: a decode takes one token, an unfinished prefill takes the next chunk that fits. Waiting
requests are then admitted in order while budget, ``max_num_seqs`` and free blocks allow; their
prefill may be chunked over several steps, mixed with other requests' decodes.

A model whose every layer has a sliding window releases each request's blocks that fell out
of the window before the request's next chunk is given room (``BlockManager.release_out_of_window``).

When a running request cannot get a block, the newest running request is preempted: its blocks
are freed and it goes back to the *front* of the waiting queue to be recomputed later (the prefix
cache often makes that cheap). No new request is admitted in a step that preempted, so preempted
work resumes before new arrivals, and since admission refuses any request that could not fit in
the whole cache on its own, the oldest request can always make progress: no deadlock, no
starvation.

A request that shares its prompt with an earlier choice of the same API request (parallel
sampling: ``Request.prompt_source``) is held aside, outside the queue, until that source has
computed the prompt's full blocks. It then joins the queue ahead of later arrivals and, when
admitted, maps those blocks (``BlockManager.share_prompt``) and computes only the rest of its
prompt: ``n`` choices prefill their prompt once. If the source ends first, the request is
admitted like any other (the prefix cache may still hold the blocks).

With overlapped scheduling the next step is scheduled while the current one still runs on the
device: a request whose token is being sampled counts that token as known
(``Request.num_in_flight``), so it gets its next decode slot now and its input id is taken from
the device. One that will have reached max_tokens with that token is left out.

A step's effect on the requests' bookkeeping is recorded here too, in two calls the engine core
makes around the device work: ``launched`` (the step is queued: its tokens count as computed,
its sampled tokens as in flight) and ``landed`` (its sampled ids are on the host).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from pagedserve.backend.config import SchedulerConfig
from pagedserve.backend.engine.block_manager import BlockManager
from pagedserve.backend.engine.request import Request, RequestStatus


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    # True when this step computes the request's last known token, so a new one is sampled.
    samples: bool
    # Of the new tokens, the last ``num_drafts`` are the request's draft tokens: the step
    # samples after its known token and after each draft (``1 + num_drafts`` rows).
    num_drafts: int = 0


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    # The requests this step samples a token for, in batch order.
    samplers: list[Request] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # The block manager's table: row ``request.table_row`` holds each scheduled request's blocks.
    block_table: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int32))

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    def add(self, request: Request, num_new_tokens: int, samples: bool, num_drafts: int = 0) -> None:
        self.scheduled.append(ScheduledRequest(request, num_new_tokens, samples, num_drafts))
        if samples:
            self.samplers.extend([request] * (1 + num_drafts))


def _reaches_max_tokens(req: Request) -> bool:
    return len(req.output_token_ids) + req.num_in_flight >= req.params.max_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # Requests held aside until their prompt source has computed the shared blocks.
        self.held: list[Request] = []
        self.num_preemptions = 0
        # When admission was first held back for a group (None: not held back now).
        self._deferred_since: float | None = None

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.held)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.held) + len(self.running)

    def add_request(self, request: Request) -> None:
        """Queue a request; one with a live prompt source is held aside until it can share."""
        if request.prompt_source is not None:
            if self.block_manager.shareable_prompt_blocks(request) > 0:
                self.held.append(request)
                return
            request.prompt_source = None  # a prompt within one block: nothing to share
        self.waiting.append(request)

    def _can_share(self, request: Request) -> bool:
        """Whether the request's prompt source holds the shareable blocks, computed or being
        computed by a launched step (a later step reads them after it on the device)."""
        source = request.prompt_source
        assert source is not None
        bm = self.block_manager
        shared_tokens = bm.shareable_prompt_blocks(request) * bm.block_size
        return (
            source.status is RequestStatus.RUNNING
            and source.num_computed_tokens >= shared_tokens
            and bm.can_share_prompt(source, request)
        )

    def _release_held(self) -> None:
        """Queue the held requests whose source is ready (or gone), ahead of every request
        that arrived after them: behind the preempted ones at the front, which are older."""
        ready = []
        for req in self.held:
            source = req.prompt_source
            assert source is not None
            if source.is_finished or not self.block_manager.can_share_prompt(source, req):
                # Gone, or past blocks it released out of the window: no sharing (the prefix
                # cache may still hold the blocks).
                req.prompt_source = None
                ready.append(req)
            elif self._can_share(req):
                ready.append(req)
        if not ready:
            return
        self.held = [req for req in self.held if req not in ready]
        at = 0
        while at < len(self.waiting) and self.waiting[at].status is RequestStatus.PREEMPTED:
            at += 1
        for offset, req in enumerate(ready):
            self.waiting.insert(at + offset, req)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(block_table=self.block_manager.block_table.table)
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.num_in_flight and _reaches_max_tokens(req):
                i += 1  # its last token is on the way: it finishes when that is processed
                continue
            expected = req.num_tokens_with_in_flight
            n = min(expected - req.num_computed_tokens, budget)
            # Drafts ride on a decode (its known token's row first), as many as the budget has.
            drafts = 0
            if req.draft_token_ids and n == expected - req.num_computed_tokens == 1:
                drafts = min(len(req.draft_token_ids), budget - 1)
                n += drafts
            bm.release_out_of_window(req)
            while not bm.allocate_slots(req, n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.add(req, n, req.num_computed_tokens + n - drafts == expected, drafts)
                budget -= n
                i += 1

        if not out.preempted:
            self._admit_waiting(out, budget)
        now = time.time()
        for s in out.scheduled:
            req = s.request
            times = req.times
            if times.first_token is None:  # decoding requests were scheduled before
                if times.first_scheduled is None:
                    times.first_scheduled = now
                if req.num_computed_tokens < req.num_prompt_tokens:
                    req.num_prefill_chunks += 1
        return out

    def _admission_deferred(self) -> bool:
        """Whether waiting requests hold back this step to join later in a group: while fewer
        slots are free than the group needs, for at most max_admission_wait_s from the first
        step that could have admitted one."""
        group = min(self.config.admission_group, len(self.waiting))
        free = self.config.max_num_seqs - len(self.running)
        resumes = self.waiting and self.waiting[0].status is RequestStatus.PREEMPTED
        if group <= 1 or not self.running or free >= group or free == 0 or resumes:
            self._deferred_since = None
            return False
        now = time.monotonic()
        if self._deferred_since is None:
            self._deferred_since = now
        if now - self._deferred_since < self.config.max_admission_wait_s:
            return True
        self._deferred_since = None
        return False

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        bm = self.block_manager
        if self.held:
            self._release_held()
        if self._admission_deferred():
            return
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if req.num_in_flight:
                break  # preempted while its last token was in flight: admit once it lands
            if req.prompt_source is not None and self._can_share(req):
                hit = bm.share_prompt(req.prompt_source, req)
            else:
                hit = bm.match_prefix(req)
            req.num_computed_tokens = hit
            bm.release_out_of_window(req)
            if req.num_cached_prompt_tokens < 0:
                req.num_cached_prompt_tokens = min(hit, req.num_prompt_tokens)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not bm.allocate_slots(req, n):
                bm.free(req)  # give back the prefix hits; retry next step
                req.num_computed_tokens = 0
                break
            req.prompt_source = None
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.add(req, n, req.num_computed_tokens + n == req.num_tokens)
            budget -= n

    def _preempt(self, req: Request) -> None:
        self.block_manager.free(req)
        req.draft_token_ids = []
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        req.times.preempted.append(time.time())
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    # -- a step's effect on the requests -----------------------------------------------------
    def launched(self, out: SchedulerOutput) -> list[int]:
        """The step is queued on the device: its tokens count as computed and the tokens it
        samples as in flight. Returns each scheduled request's computed count after the step
        (what ``landed`` registers in the prefix cache)."""
        computed_after = []
        for s in out.scheduled:
            req = s.request
            req.num_computed_tokens += s.num_new_tokens
            computed_after.append(req.num_computed_tokens)
            if s.samples:
                req.num_in_flight += 1
        return computed_after

    def landed(self, out: SchedulerOutput, computed_after: list[int]) -> None:
        """The step's sampled ids are on the host (the caller records them): nothing is in
        flight for it any more, and each running request's blocks that the step filled are
        registered in the prefix cache (every id they hold is known by now)."""
        bs = self.block_manager.block_size
        for s, computed in zip(out.scheduled, computed_after):
            req = s.request
            if s.samples:
                req.num_in_flight -= 1
            # Only a step that filled a block has one to register (checked here: this runs
            # for every request every step).
            filled_a_block = computed // bs > (computed - s.num_new_tokens) // bs
            if filled_a_block and req.status is RequestStatus.RUNNING:
                self.block_manager.cache_full_blocks(req, computed)

    def finish(self, req: Request) -> None:
        """Remove a finished or aborted request wherever it is and free its blocks and row."""
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        elif req in self.held:
            self.held.remove(req)
        req.prompt_source = None
        self.block_manager.free(req)
        req.status = RequestStatus.FINISHED
