"""The engine core: scheduler, block manager, runner and output processing behind one request
table, its step loop, and the engine process that runs it away from the server.

``EngineCore.step()`` runs schedule -> launch -> process outputs and returns the deltas of one
step; the offline ``LLM`` calls it in a loop. ``serve`` is the loop a server runs on a thread or
in the engine process: commands in (``messages.AddRequest`` / ``AbortRequest`` / ``Shutdown``),
one ``StepOutputs`` per step out.

With overlapped scheduling (the default on CUDA) a step schedules and queues the *next* step
before it waits for the current one, so host work (scheduling, batch building, detokenization,
stop checks) runs while the device computes instead of between device steps. The next step's
inputs that are still being sampled come from the device (``runner.batch.InFlightTokens``);
the host's bookkeeping is two counts on each request (computed, in flight), moved by
``Scheduler.launched`` and ``Scheduler.landed``.

The engine process is a fresh interpreter (``python -m pagedserve.backend.engine.core --fd N``,
like the tensor-parallel workers): it never re-runs the caller's main script, as
``multiprocessing``'s spawn would, and inherits nothing of the server's process (CUDA least of
all). It talks to its client over a socket pair in ``messages``' encoding and exits when the
socket closes.
"""

from __future__ import annotations

import argparse
import gc
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Protocol

from pagedserve.backend.config import EngineConfig
from pagedserve.backend.engine.block_manager import BlockManager
from pagedserve.backend.engine.messages import (
    AbortRequest,
    AddRequest,
    Command,
    EngineExited,
    EngineFailed,
    EngineLoadFailed,
    EngineReady,
    Event,
    LoadInfo,
    ModelInfo,
    Shutdown,
    StartEngine,
    StepInfo,
    StepOutputs,
    decode,
    encode,
    portable,
)
from pagedserve.backend.engine.output import OutputProcessor
from pagedserve.backend.engine.request import (
    FinishReason,
    Request,
    RequestBuilder,
    RequestOutputDelta,
)
from pagedserve.backend.engine.scheduler import Scheduler, SchedulerOutput
from pagedserve.backend.errors import EngineDeadError
from pagedserve.backend.models.layers import kv_attention_window
from pagedserve.backend.runner.model_runner import LaunchedStep, ModelRunner
from pagedserve.backend.spec_decode.proposer import build_proposer

logger = logging.getLogger(__name__)

# The loop waits at most this long for a command while idle (then it looks again).
IDLE_WAIT_S = 1.0

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


@dataclass
class _InFlight:
    """A launched step and what processing its result needs."""

    sched: SchedulerOutput
    launched: LaunchedStep
    computed_after: list[int]  # each scheduled request's computed tokens once the step is done
    info: StepInfo


class CommandSource(Protocol):
    """Where the loop reads the client's commands, in the order they were sent."""

    def get(self, timeout_s: float) -> Command | None:
        """The next command, waiting up to ``timeout_s`` (0: not at all); None if none came."""


class QueueCommands:
    """Commands from a client in this process."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Command] = queue.SimpleQueue()

    def put(self, command: Command) -> None:
        self._queue.put(command)

    def get(self, timeout_s: float) -> Command | None:
        try:
            return self._queue.get(timeout=timeout_s) if timeout_s > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None


class SocketCommands:
    """Commands from the server's process, read by the loop itself between steps (no reader
    thread, no hand-off). A closed socket means the server's process is gone: Shutdown."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def get(self, timeout_s: float) -> Command | None:
        try:
            if not self._conn.poll(timeout_s):
                return None
            message = decode(self._conn.recv_bytes())
        except (EOFError, OSError):
            logger.warning("the server's process is gone: stopping the engine")
            return Shutdown()
        if not isinstance(message, AddRequest | AbortRequest | Shutdown):
            raise TypeError(f"unexpected message from the client: {type(message).__name__}")
        return message


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.runner = ModelRunner(config)
        on_cuda = self.runner.device.type == "cuda"
        if on_cuda:
            relax_gc()
        loaded = self.runner.loaded
        self.tokenizer: Any = loaded.tokenizer
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = self.runner.model.vocab_size
        block_size = config.cache.block_size
        self.block_manager = BlockManager(
            self.runner.num_blocks,
            block_size,
            max_seqs=config.scheduler.max_num_seqs,
            max_blocks_per_seq=-(-self.max_model_len // block_size),
            enable_prefix_caching=config.cache.enable_prefix_caching,
            attention_window=kv_attention_window(self.runner.model),
        )
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.output = OutputProcessor(self.tokenizer, self.max_model_len)
        # The request table: every live request, and through it all of its state.
        self.requests: dict[str, Request] = {}
        self.last_step: StepInfo | None = None
        self.num_adds_received = 0
        self._in_flight: _InFlight | None = None
        overlap = config.overlap_scheduling
        if overlap is None:
            # On the CPU the host and the "device" are the same cores. With tensor parallelism
            # it is opt-in until measured on NCCL (its logic is tested over gloo).
            overlap = on_cuda and config.parallel.tensor_parallel_size == 1
        self.proposer = build_proposer(config.speculative)
        if self.proposer is not None and overlap:
            # A verified step changes how many tokens its requests have computed, which the
            # next step, scheduled while it runs, would have to know.
            logger.info("speculative decoding: overlapped scheduling is off")
            overlap = False
        self.overlap = overlap
        eos_token_ids = frozenset(loaded.eos_token_ids)
        self.model_info = ModelInfo(
            name=config.model.served_model_name or loaded.name,
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            block_size=block_size,
            dtype=str(self.runner.dtype).removeprefix("torch."),
            device=str(self.runner.device),
            eos_token_ids=sorted(eos_token_ids),
        )
        self.builder = RequestBuilder(
            tokenizer=self.tokenizer,
            vocab_size=self.vocab_size,
            max_model_len=self.max_model_len,
            eos_token_ids=eos_token_ids,
            block_size=block_size,
            num_blocks=self.block_manager.num_blocks,
            limits=config.limits,
        )

    # -- the request table -------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Take an admitted request (built and validated by ``builder``, its id unused: the
        client checks both once)."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is live: admission must refuse it")
        request.generator = self.runner.generator_for(request.params.seed)
        self.output.start(request)
        if request.prompt_source_id is not None:
            # Shared only while the source lives and has the very same prompt; otherwise the
            # request computes its own (correct either way, only slower).
            source = self.requests.get(request.prompt_source_id)
            if source is not None and source.prompt_token_ids == request.prompt_token_ids:
                request.prompt_source = source
        self.requests[request.request_id] = request
        self.scheduler.add_request(request)

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
        """The one teardown: out of the table and the scheduler, blocks and rows freed; the
        rest of its state goes with the object. Stamps its final delta."""
        req.times.finished = time.time()
        self.scheduler.finish(req)
        self.runner.release(req)
        del self.requests[req.request_id]
        self.output.final_fields(req, final_delta)

    # -- the step ----------------------------------------------------------------------------
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
            self._in_flight, failed = self._launch()
            if self._in_flight is None:
                return failed
        current = self._in_flight
        following, failed = self._launch() if self.overlap else (None, [])
        deltas = failed + self._process(current)
        self._in_flight = following
        return deltas

    def _propose_drafts(self) -> None:
        """Draft tokens for the running requests that decode greedily next, for their step to
        verify. Requests whose next token depends on more than the argmax (sampling,
        penalties, a logit bias, logprobs, min_tokens still banning the end) decode one token
        at a time, in the same steps."""
        assert self.proposer is not None
        eligible = []
        for req in self.scheduler.running:
            req.draft_token_ids = []
            params = req.params
            if (
                params.temperature == 0.0
                and not params.has_penalties
                and not params.logit_bias
                and params.logprobs is None
                and len(req.output_token_ids) >= params.min_tokens
                and not req.num_in_flight
                and req.num_computed_tokens == req.num_tokens - 1
            ):
                eligible.append(req)
        if not eligible:
            return
        proposals = self.proposer.propose([req.all_token_ids for req in eligible])
        for req, drafts in zip(eligible, proposals):
            # No draft past max_tokens (the last token is the target's own) or the context.
            room = min(
                req.params.max_tokens - len(req.output_token_ids) - 1,
                self.max_model_len - req.num_tokens,
            )
            req.draft_token_ids = drafts[: max(0, room)]

    def _launch(self) -> tuple[_InFlight | None, list[RequestOutputDelta]]:
        """Schedule and queue a step; on failure, finish its requests and return their deltas."""
        start = time.time()
        if self.proposer is not None:
            self._propose_drafts()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return None, []
        decode_tokens = 0  # a token at a position past the prompt is a decode (drafts too)
        for s in sched.scheduled:
            if s.request.num_computed_tokens >= s.request.num_prompt_tokens:
                decode_tokens += 1 + s.num_drafts
        info = StepInfo(
            start=start,
            end=start,
            request_ids=[s.request.request_id for s in sched.scheduled],
            num_prefill_tokens=sched.num_batched_tokens - decode_tokens,
            num_decode_tokens=decode_tokens,
            num_preempted=len(sched.preempted),
            kv_cache_usage=self.block_manager.usage,
        )
        try:
            launched = self.runner.execute(sched)
        except EngineDeadError:  # a tensor-parallel rank is gone: no later step can run either
            raise
        except Exception as exc:  # a failed forward fails this step's requests, not the engine
            self.last_step = info
            return None, self._fail_step(sched, exc)
        computed_after = self.scheduler.launched(sched)
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
        except Exception as exc:  # its requests end with the error; their counts go with them
            return self._fail_step(step.sched, exc)
        self.scheduler.landed(step.sched, step.computed_after)
        deltas: list[RequestOutputDelta] = []
        now = time.time()
        row = 0
        for s in step.sched.scheduled:
            if not s.samples:
                continue
            req, rows = s.request, 1 + s.num_drafts
            token_ids = result.token_ids[row : row + rows]
            logprobs = result.logprobs[row : row + rows]
            row += rows
            if req.is_finished:  # aborted, or it stopped a step earlier: wasted tokens
                continue
            if s.num_drafts:
                token_ids = self._verified(req, s.num_drafts, token_ids)
            for token_id, logprob in zip(token_ids, logprobs):
                try:
                    if req.times.first_token is None:
                        req.times.first_token = now
                    delta = self.output.process_token(req, token_id, logprob)
                except Exception as exc:  # e.g. detokenization: fail this request only
                    logger.exception("output processing failed for request %s", req.request_id)
                    deltas.append(self._finish(req, FinishReason.ERROR, f"output processing failed: {exc}"))
                    break
                deltas.append(delta)
                if delta.finished:
                    self._release(req, delta)
                    break
        step.info.end = time.time()
        return deltas

    def _verified(self, req: Request, num_drafts: int, target_ids: list[int]) -> list[int]:
        """The tokens a verified step emits: the drafts the target's argmax agreed with, in
        order up to the first disagreement, then the target's own token there (or after the
        last draft). The K/V computed for the rejected drafts is dropped: the request's
        computed count moves back and blocks that only they used are given back."""
        drafts = req.draft_token_ids[:num_drafts]
        accepted = 0
        while accepted < num_drafts and drafts[accepted] == target_ids[accepted]:
            accepted += 1
        req.num_draft_tokens += num_drafts
        req.num_accepted_tokens += accepted
        req.draft_token_ids = []
        req.num_computed_tokens -= num_drafts - accepted
        self.block_manager.discard_tail(req, req.num_computed_tokens)
        return target_ids[: accepted + 1]

    # -- lifecycle ---------------------------------------------------------------------------
    def get_load(self) -> LoadInfo:
        bm = self.block_manager
        return LoadInfo(
            num_waiting=self.scheduler.num_waiting,
            num_running=len(self.scheduler.running),
            kv_cache_usage=bm.usage,
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_blocks,
            prefix_cache_queries=bm.prefix_cache_queries,
            prefix_cache_hits=bm.prefix_cache_hits,
            num_adds_received=self.num_adds_received,
        )

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any; the engine cannot step afterwards."""
        self.runner.shutdown()

    def serve(self, commands: CommandSource, emit: Callable[[Event], None]) -> None:
        """The step loop: apply the client's commands, step while there is work, ``emit`` one
        StepOutputs per step, until Shutdown (every request then ends as aborted) or a fatal
        error (EngineFailed). ``emit`` must be safe to call from a tensor-parallel monitor
        thread too (it reports a dead rank)."""
        self.runner.add_failure_listener(
            lambda reason: emit(EngineFailed(f"the engine has stopped: {reason}"))
        )
        reported: StepInfo | None = None
        try:
            while True:
                deltas, applied, stopping = self._apply(commands, block=not self.has_unfinished())
                if stopping:
                    break
                if self.has_unfinished():
                    deltas += self.step()
                elif not applied:
                    continue  # an idle wake-up: nothing to report
                step = self.last_step if self.last_step is not reported else None
                reported = self.last_step
                emit(StepOutputs(deltas, step, self.get_load()))
        except BaseException as exc:  # the loop itself broke: fail everyone, clearly
            logger.exception("engine loop died")
            emit(EngineFailed(f"the engine loop died: {exc}"))
            return
        final = [self._finish(req, FinishReason.ABORT) for req in list(self.requests.values())]
        emit(StepOutputs(final, None, self.get_load()))
        emit(EngineFailed("the engine has shut down"))

    def _apply(
        self, commands: CommandSource, block: bool
    ) -> tuple[list[RequestOutputDelta], int, bool]:
        """Apply queued commands (waiting for one when ``block``); returns the aborts' final
        deltas, how many commands were applied and whether Shutdown came."""
        deltas: list[RequestOutputDelta] = []
        applied = 0
        while True:
            command = commands.get(IDLE_WAIT_S if block else 0.0)
            if command is None:
                return deltas, applied, False
            block = False
            applied += 1
            if isinstance(command, AddRequest):
                self.num_adds_received += 1
                self.add(command.request)
            elif isinstance(command, AbortRequest):
                delta = self.abort(command.request_id)
                if delta is not None:
                    deltas.append(delta)
            elif isinstance(command, Shutdown):
                return deltas, applied, True
            else:
                raise TypeError(f"unexpected command {type(command).__name__}")


# -- the engine process ----------------------------------------------------------------------
def run_engine_process(conn: Connection) -> None:
    """The engine process: read StartEngine, load, report ready, run the loop until stopped."""
    started = time.monotonic()
    lock = threading.Lock()  # the loop and a tensor-parallel monitor both send

    def emit(event: Event) -> None:
        try:
            frame = encode(event)
            with lock:
                conn.send_bytes(frame)
        except (OSError, ValueError):  # the server's process is gone; the reader stops us
            pass

    try:
        start = decode(conn.recv_bytes())
    except (EOFError, OSError):
        return  # the server's process went away before it sent anything
    assert isinstance(start, StartEngine)
    try:
        core = EngineCore(start.config)
    except BaseException as exc:  # the server's process reports it in one line
        logger.debug("the engine failed to load", exc_info=exc)
        emit(EngineLoadFailed(portable(exc)))
        conn.close()
        return
    emit(EngineReady(core.model_info, core.builder, core.get_load()))
    logger.info("engine process ready in %.1f s", time.monotonic() - started)
    try:
        core.serve(SocketCommands(conn), emit)
    finally:
        core.shutdown()
        emit(EngineExited())
        conn.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="pagedserve's engine process (started by the server)")
    parser.add_argument("--fd", type=int, required=True, help="the socket to the server's process")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The server owns the signals: Ctrl-C reaches the whole process group, and the engine must
    # keep stepping while the server drains its streams.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    run_engine_process(Connection(args.fd))


if __name__ == "__main__":
    # Run the importable module's main, not this copy's: what crosses the socket must pickle
    # under the module's name, not "__main__".
    from pagedserve.backend.engine.core import main as module_main

    module_main()
