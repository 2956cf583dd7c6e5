"""The synchronous engine: admission, the step loop body, and request bookkeeping.

``step()`` runs schedule -> launch -> process outputs and returns the deltas of one step. The
offline ``LLM`` calls it in a loop; ``AsyncEngine`` calls it from a dedicated thread. With
overlapped scheduling (the default on CUDA) a call schedules and queues the *next* step before it
waits for the current one, so host work (scheduling, batch building, detokenization, stop checks)
runs while the device computes instead of between device steps.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pagedserve.backend.config import EngineConfig
from pagedserve.backend.engine.block_manager import BlockManager
from pagedserve.backend.engine.output import OutputProcessor
from pagedserve.backend.engine.request import (
    FinishReason,
    Request,
    RequestOutputDelta,
    RequestStatus,
)
from pagedserve.backend.engine.scheduler import Scheduler, SchedulerOutput
from pagedserve.backend.engine.request_builder import RequestBuilder, request_id_in_use
from pagedserve.backend.errors import EngineDeadError
from pagedserve.backend.runner.model_runner import LaunchedStep, ModelRunner
from pagedserve.backend.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class ModelInfo:
    name: str
    max_model_len: int
    vocab_size: int
    block_size: int
    dtype: str
    device: str
    eos_token_ids: list[int]


@dataclass
class StepInfo:
    """What one engine step did, for telemetry (``engine.step`` spans, metrics)."""

    start: float
    end: float
    request_ids: list[str]
    num_prefill_tokens: int
    num_decode_tokens: int
    num_preempted: int
    kv_cache_usage: float


@dataclass
class LoadInfo:
    num_waiting: int
    num_running: int
    kv_cache_usage: float
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


@dataclass
class _InFlight:
    """A launched step and what processing its result needs."""

    sched: SchedulerOutput
    launched: LaunchedStep
    computed_after: list[int]  # each scheduled request's computed tokens once the step is done
    info: StepInfo


# Allocations between young-generation collections, and how many of those per older one.
# Each step allocates thousands of short-lived objects per hundred requests; at the default
# (700, 10, 10) the collector runs full passes over the model's and tokenizer's millions of
# objects every few steps, which measured as half the host time of a 256-request decode step.
# Applied with CUDA only: on the CPU path, where the host runs the model too, `bench offline`
# measured 20% slower with these thresholds (240 vs 310 tok/s) for reasons not isolated.
GC_THRESHOLDS = (50_000, 10, 1_000)


def relax_gc() -> None:
    """Raise the cyclic collector's thresholds (never lower them) for this process."""
    current = gc.get_threshold()
    gc.set_threshold(*(max(c, t) for c, t in zip(current, GC_THRESHOLDS)))


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.runner = ModelRunner(config)
        on_cuda = self.runner.device.type == "cuda"
        if on_cuda:
            relax_gc()
        loaded = self.runner.loaded
        self.tokenizer: Any = loaded.tokenizer
        self.eos_token_ids = frozenset(loaded.eos_token_ids)
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = self.runner.model.vocab_size
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching
        )
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.output = OutputProcessor(self.tokenizer, self.max_model_len)
        self.requests: dict[str, Request] = {}
        self.last_step: StepInfo | None = None
        self._in_flight: _InFlight | None = None
        self._num_reading_history = 0  # live requests whose params read earlier tokens
        overlap = config.overlap_scheduling
        if overlap is None:
            # On the CPU the host and the "device" are the same cores. With tensor parallelism
            # it is opt-in until measured on NCCL (its logic is tested over gloo).
            overlap = on_cuda and config.parallel.tensor_parallel_size == 1
        self.overlap = overlap
        self.model_info = ModelInfo(
            name=config.model.served_model_name or loaded.name,
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            block_size=config.cache.block_size,
            dtype=str(self.runner.dtype).removeprefix("torch."),
            device=str(self.runner.device),
            eos_token_ids=sorted(self.eos_token_ids),
        )
        self.builder = RequestBuilder(
            tokenizer=self.tokenizer,
            vocab_size=self.vocab_size,
            max_model_len=self.max_model_len,
            eos_token_ids=self.eos_token_ids,
            block_size=config.cache.block_size,
            num_blocks=self.block_manager.num_blocks,
        )

    # -- admission -------------------------------------------------------------------------
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.builder.tokenize(text, add_special_tokens)

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.builder.render_chat(messages)

    def make_request(
        self,
        *,
        prompt: str | None = None,
        prompt_token_ids: list[int] | None = None,
        params: SamplingParams,
        request_id: str | None = None,
    ) -> Request:
        """Validate and tokenize; raises a typed error naming the bad field."""
        if request_id:
            self._check_unused(request_id)
        return self.builder.build(
            prompt=prompt, prompt_token_ids=prompt_token_ids, params=params, request_id=request_id
        )

    def add_request(self, request: Request) -> None:
        """Admit a built request; raises a typed error (id in use, queue full) and changes
        nothing if it cannot."""
        self._check_unused(request.request_id)
        self.scheduler.add_request(request)  # may raise QueueFullError
        self.requests[request.request_id] = request
        self.output.add_request(request)
        self.runner.add_request(request)
        if request.params.reads_token_history:
            self._num_reading_history += 1

    def _check_unused(self, request_id: str) -> None:
        if request_id in self.requests:
            raise request_id_in_use(request_id)

    def abort(self, request_id: str) -> RequestOutputDelta | None:
        """Stop a request now and free its blocks; returns its final (abort) delta."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        return self._finish(req, FinishReason.ABORT)

    def _finish(
        self, req: Request, reason: FinishReason, error: str | None = None
    ) -> RequestOutputDelta:
        req.finish_reason = reason
        delta = RequestOutputDelta(
            request_id=req.request_id, text="", token_ids=[], finished=True,
            finish_reason=reason, error=error,
        )
        self._release(req, delta)
        return delta

    def _release(self, req: Request, final_delta: RequestOutputDelta) -> None:
        """Free everything a finished request holds and stamp its final delta."""
        req.times.finished = time.time()
        self.scheduler.finish(req)
        self.runner.remove_request(req.request_id)
        if self.requests.pop(req.request_id, None) is not None and req.params.reads_token_history:
            self._num_reading_history -= 1
        self.output.remove(req.request_id)
        self.output.final_fields(req, final_delta)

    # -- the step --------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        """Requests wait or run, or a launched step still has to be drained."""
        return self.scheduler.num_unfinished > 0 or self._in_flight is not None

    def step(self) -> list[RequestOutputDelta]:
        """Run one step and return its deltas.

        With overlapped scheduling the step returned is the one launched by the previous call:
        the next step is scheduled and queued on the device first, so the device computes it
        while the host turns this step's tokens into text.
        """
        if self._in_flight is None:
            self._in_flight, failed = self._launch(None)
            if self._in_flight is None:
                return failed
        current = self._in_flight
        following, failed = self._launch(current) if self._may_overlap() else (None, [])
        deltas = failed + self._process(current)
        self._in_flight = following
        return deltas

    def _may_overlap(self) -> bool:
        """Penalties and min_tokens read every earlier token on the host, so a batch holding
        such a request waits for the previous step's ids before it is scheduled."""
        return self.overlap and self._num_reading_history == 0

    def _launch(self, previous: _InFlight | None) -> tuple[_InFlight | None, list[RequestOutputDelta]]:
        """Schedule and queue a step; on failure, finish its requests and return their deltas."""
        start = time.time()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return None, []
        request_ids = []
        decode_tokens = 0  # a token at a position past the prompt is a decode
        for s in sched.scheduled:
            req = s.request
            request_ids.append(req.request_id)
            if req.num_computed_tokens >= req.num_prompt_tokens:
                decode_tokens += 1
        info = StepInfo(
            start=start,
            end=start,
            request_ids=request_ids,
            num_prefill_tokens=sched.num_batched_tokens - decode_tokens,
            num_decode_tokens=decode_tokens,
            num_preempted=len(sched.preempted),
            kv_cache_usage=self.block_manager.usage,
        )
        try:
            launched = self.runner.launch(sched, None if previous is None else previous.launched)
        except EngineDeadError:  # a tensor-parallel rank is gone: no later step can run either
            raise
        except Exception as exc:  # a failed forward fails this step's requests, not the engine
            self.last_step = info
            return None, self._fail_step(sched, exc)
        computed_after = []
        for s in sched.scheduled:
            s.request.num_computed_tokens += s.num_new_tokens
            computed_after.append(s.request.num_computed_tokens)
        for req in launched.requests:
            req.num_pending_outputs += 1
        return _InFlight(sched, launched, computed_after, info), []

    def _fail_step(self, sched: SchedulerOutput, exc: Exception) -> list[RequestOutputDelta]:
        """Finish the step's still-live requests with an error; the engine goes on."""
        logger.exception("model step failed")
        return [
            self._finish(s.request, FinishReason.ERROR, f"model step failed: {exc}")
            for s in sched.scheduled
            if not s.request.is_finished
        ]

    def _process(self, step: _InFlight) -> list[RequestOutputDelta]:
        """Wait for a launched step's ids, then record them: prefix-cache registration, text,
        stop checks, and the release of finished requests."""
        # Requests that ended while the step ran (aborted, or stopped by the step before) got
        # nothing from it.
        step.info.request_ids = [
            s.request.request_id for s in step.sched.scheduled if not s.request.is_finished
        ]
        self.last_step = step.info
        try:
            result = step.launched.wait()
        except EngineDeadError:  # a tensor-parallel rank is gone: no later step can run either
            raise
        except Exception as exc:
            for req in step.launched.requests:
                req.num_pending_outputs -= 1
            return self._fail_step(step.sched, exc)
        deltas: list[RequestOutputDelta] = []
        now = time.time()
        for req, token_id, logprob in zip(result.requests, result.token_ids, result.logprobs):
            req.num_pending_outputs -= 1
            if req.is_finished:  # aborted, or it stopped a step earlier: a wasted token
                continue
            try:
                if req.times.first_token is None:
                    req.times.first_token = now
                delta = self.output.process_token(req, token_id, logprob)
            except Exception as exc:  # e.g. detokenization: fail this request only
                logger.exception("output processing failed for request %s", req.request_id)
                deltas.append(self._finish(req, FinishReason.ERROR, f"output processing failed: {exc}"))
                continue
            if delta.finished:
                self._release(req, delta)
            deltas.append(delta)
        bs = self.block_manager.block_size
        for s, computed in zip(step.sched.scheduled, step.computed_after):
            req = s.request
            # Only a step that filled a block has one to register (checked here: this runs
            # for every request every step).
            filled_a_block = computed // bs > (computed - s.num_new_tokens) // bs
            if filled_a_block and req.status is RequestStatus.RUNNING:  # not finished or preempted
                self.block_manager.cache_full_blocks(req, computed)
        step.info.end = time.time()
        return deltas

    # -- lifecycle -------------------------------------------------------------------------
    def add_failure_listener(self, listener: Callable[[str], None]) -> None:
        """``listener(reason)`` runs on a monitor thread if a tensor-parallel worker dies."""
        self.runner.add_failure_listener(listener)

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any; the engine cannot step afterwards."""
        self.runner.shutdown()

    def get_load(self) -> LoadInfo:
        bm = self.block_manager
        return LoadInfo(
            num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
            kv_cache_usage=bm.usage,
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_blocks,
            prefix_cache_queries=bm.prefix_cache_queries,
            prefix_cache_hits=bm.prefix_cache_hits,
        )
