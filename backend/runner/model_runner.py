"""Executes one scheduled step: flat varlen batch in, sampled token ids out.

The runner owns the model, the KV cache tensors and the sampler. It never decides who runs: it
reads the scheduler's output (which requests, how many new tokens each, their block tables) and
returns one token per request whose step reached the end of its known tokens.

With tensor parallelism there is one runner per rank, each holding its shard of the model and
of the KV cache. Rank 0's runner (in the engine process) starts the others
(``TensorParallelLeader``), builds each step's ``StepBatch`` and sends it to them; every rank
then runs the same forward (``run_batch``), and rank 0 alone samples. Input ids that rank 0's
device is still sampling (overlapped scheduling) reach the other ranks by a device-side
broadcast inside the step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from pagedserve.backend.config import EngineConfig
from pagedserve.backend.engine.request import Request, TokenLogprob
from pagedserve.backend.engine.scheduler import SchedulerOutput
from pagedserve.backend.errors import EngineDeadError, ModelLoadError
from pagedserve.backend.models.loader import LoadedModel, load_model, resolve_dtype
from pagedserve.backend.runner.attention import AttentionMetadata, forward_context, get_attention_backend
from pagedserve.backend.runner.block_table import PersistentBlockTables
from pagedserve.backend.runner.cuda_graph import DecodeGraphs
from pagedserve.backend.runner.distributed import LaunchEnv, TensorParallelGroup
from pagedserve.backend.runner.sampler import (
    DeviceSample,
    Sampler,
    SamplingBatch,
    arrays_to_device,
)
from pagedserve.backend.runner.step_batch import StepBatch
from pagedserve.backend.runner.tp_leader import TensorParallelLeader

GIB = 1 << 30
# How long shutdown waits for an in-flight step before stopping the workers without a word.
_SHUTDOWN_STEP_WAIT_S = 30.0
# Polling a tensor-parallel step's completion: the first and the longest pause between checks
# (the longest bounds the latency the polling adds to a step).
_STEP_POLL_FIRST_S = 1e-5
_STEP_POLL_MAX_S = 1e-4


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def rank_device(name: str, local_rank: int) -> torch.device:
    """A tensor-parallel rank's device: GPU ``local_rank`` (modulo the visible GPUs, so one GPU
    per node or per container also works) unless the config names an index."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return device


def _rank0_local_rank() -> int:
    """LOCAL_RANK when rank 0 was started with torch.distributed's variables, else 0."""
    try:
        env = LaunchEnv.from_environ()
    except ValueError:
        return 0  # TensorParallelLeader.launch reports the incomplete environment
    return 0 if env is None or env.local_rank is None else env.local_rank


@dataclass
class StepResult:
    """Sampled tokens of one step, aligned with ``requests`` (those whose step samples)."""

    requests: list[Request]
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


@dataclass
class LaunchedStep:
    """A step queued on the device whose sampled ids may still be on their way to the host."""

    requests: list[Request]  # those whose step samples, in the order of ``sample``'s rows
    sample: DeviceSample | None  # None when the step samples nothing

    # How to wait for the sampled ids' copy to the host (None: a blocking synchronize).
    wait_for_copy: Callable[[torch.cuda.Event], None] | None = None

    def sample_row(self, request: Request) -> int:
        return self._rows[id(request)]

    def __post_init__(self) -> None:
        self._rows = {id(r): i for i, r in enumerate(self.requests)}

    def wait(self) -> StepResult:
        """Block until this step's sampled ids are on the host."""
        if self.sample is None:
            return StepResult([], [], [])
        out = self.sample.to_host(self.wait_for_copy)
        return StepResult(self.requests, out.token_ids, out.logprobs)


@dataclass
class DeviceInputs:
    """Input ids of a step that only rank 0's device knows yet: the batch's deferred row
    ``i`` takes token ``sample_rows[i]`` of the previous step's sampled ids."""

    sample_rows: np.ndarray  # [n] int64
    sampled: torch.Tensor  # the previous step's sampled ids, on the device


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        group: TensorParallelGroup | None = None,
        device: torch.device | None = None,
    ) -> None:
        """Rank 0 (the engine) passes only ``config`` and starts the other ranks itself when
        ``tensor_parallel_size > 1``; a worker passes the group it joined and its device."""
        self.config = config
        self.tp_size = config.parallel.tensor_parallel_size
        if device is None:
            device = (
                resolve_device(config.model.device)
                if self.tp_size == 1
                else rank_device(config.model.device, _rank0_local_rank())
            )
        self.device = device
        if device.type == "cuda" and self.tp_size > 1:
            # Triton launches on the thread's current device, not the tensors' one.
            torch.cuda.set_device(device)
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        self.block_size = config.cache.block_size
        self.leader: TensorParallelLeader | None = None
        if self.tp_size > 1 and group is None:
            self.leader = TensorParallelLeader.launch(config, self.device)
            group = self.leader.group
        self.group = group
        self.rank = 0 if group is None else group.rank
        # Held for a whole step, so shutdown never talks to the workers mid-step.
        self._step_lock = threading.Lock()
        self.decode_graphs: DecodeGraphs | None = None
        try:
            self._load()
        except BaseException:
            self.shutdown()
            raise

    def _load(self) -> None:
        config = self.config
        torch.manual_seed(config.model.seed)
        self.attn_backend = get_attention_backend(self.device)
        group = self.group
        try:
            self.loaded: LoadedModel = load_model(
                config.model, self.device, self.dtype, self.attn_backend, self.rank, self.tp_size
            )
        except BaseException as exc:
            if group is not None:
                group.report_loaded(exc)
            raise
        if group is not None:
            group.report_loaded(None)
            group.wait_loaded(self.leader.check_processes if self.leader else lambda: None)
        self.model = self.loaded.model
        self.max_model_len = self.loaded.max_model_len
        generator = torch.Generator(device=self.device)
        generator.manual_seed(config.model.seed)
        self.sampler = Sampler(generator)
        self.generators: dict[str, torch.Generator] = {}
        self.num_blocks = self._num_kv_blocks()
        if group is not None:  # every rank must hold the same block count
            self.num_blocks = group.all_reduce_min(self.num_blocks)
        self.kv_caches = self._allocate_kv_caches(self.num_blocks)
        self.block_tables = PersistentBlockTables(
            config.scheduler.max_num_seqs, -(-self.max_model_len // self.block_size)
        )
        if self.device.type == "cuda" and config.enable_cuda_graphs:
            self.decode_graphs = self._capture_decode_graphs()

    # -- tensor-parallel lifecycle ---------------------------------------------------------
    def add_failure_listener(self, listener: Callable[[str], None]) -> None:
        """``listener(reason)`` runs (on a monitor thread) when a tensor-parallel worker dies."""
        if self.leader is not None:
            self.leader.add_death_listener(listener)

    def release_decode_graphs(self) -> None:
        """Drop the decode graphs (later decode steps run eagerly); see DecodeGraphs.release."""
        if self.decode_graphs is not None:
            self.decode_graphs.release()
            self.decode_graphs = None

    def check_alive(self) -> None:
        """Raise EngineDeadError once a tensor-parallel worker has died."""
        if self.leader is not None and self.leader.dead_reason is not None:
            raise EngineDeadError(self.leader.dead_reason)

    def shutdown(self) -> None:
        """Stop the other ranks (rank 0); a no-op without tensor parallelism."""
        if self.leader is None:
            return
        idle = self._step_lock.acquire(timeout=_SHUTDOWN_STEP_WAIT_S)
        try:
            if idle:  # a step still running may be replaying a graph
                self.release_decode_graphs()
            self.leader.shutdown(graceful=idle)
        finally:
            if idle:
                self._step_lock.release()

    # -- sizing ----------------------------------------------------------------------------
    def kv_block_bytes(self) -> int:
        m = self.model
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * m.num_layers * self.block_size * m.num_kv_heads * m.head_dim * elem

    def _allocate_kv_caches(self, num_blocks: int) -> list[torch.Tensor]:
        m = self.model
        shape = (2, num_blocks, self.block_size, m.num_kv_heads, m.head_dim)
        return [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(m.num_layers)]

    def _num_kv_blocks(self) -> int:
        """Blocks that fit the memory budget; an error when they cannot hold one sequence of
        max_model_len (every request would be refused, or the engine would thrash)."""
        cache = self.config.cache
        if cache.num_blocks is not None:
            return cache.num_blocks
        if self.device.type != "cuda":
            blocks = int(cache.cpu_kv_cache_gib * GIB // self.kv_block_bytes())
            budget = f"cpu_kv_cache_gib={cache.cpu_kv_cache_gib}"
        else:
            blocks = self._gpu_kv_blocks()
            budget = f"gpu_memory_utilization={cache.gpu_memory_utilization}"
        needed = -(-self.max_model_len // self.block_size)
        if blocks < needed:
            raise ModelLoadError(
                f"the KV cache budget ({budget}) holds {max(blocks, 0)} blocks of "
                f"{self.block_size} tokens, fewer than one sequence of max_model_len="
                f"{self.max_model_len} needs ({needed}): raise the budget or lower max_model_len"
            )
        return blocks

    def _gpu_kv_blocks(self) -> int:
        cache = self.config.cache
        # What a full-budget step needs beyond the weights: measured, not guessed.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self._profile_step()
        activation_peak = torch.cuda.max_memory_allocated(self.device) - before
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        budget = free - (1 - cache.gpu_memory_utilization) * total - activation_peak
        return int(budget // self.kv_block_bytes())

    @torch.inference_mode()
    def _profile_step(self) -> None:
        """One forward of max_num_batched_tokens prompt tokens plus sampling max_num_seqs rows,
        on a throwaway cache, to measure peak activation memory."""
        sched = self.config.scheduler
        n = sched.max_num_batched_tokens
        bs = self.block_size
        blocks = -(-n // bs)
        caches = self._allocate_kv_caches(blocks)
        dev = self.device
        metadata = AttentionMetadata.single_prefill(n, bs, dev)
        ids = torch.zeros(n, dtype=torch.int64, device=dev)
        with forward_context(metadata, caches):
            hidden = self.model(ids, torch.arange(n, device=dev))
        rows = min(sched.max_num_seqs, n)
        logits = self.model.compute_logits(hidden[:rows])
        logits.sort(dim=-1, descending=True)  # top-k/top-p filtering's largest temporary
        torch.cuda.synchronize(dev)
        del caches, hidden, logits

    def _capture_decode_graphs(self) -> DecodeGraphs:
        from pagedserve.kernels.paged_attention import choose_num_kv_splits

        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        kv_heads = self.model.num_kv_heads
        graphs = DecodeGraphs(
            self.model, self.kv_caches, self.config.scheduler.max_num_seqs, self.max_model_len,
            self.block_size,
            kv_splits_for=lambda size: choose_num_kv_splits(size, kv_heads, self.max_model_len, sms),
        )
        graphs.capture()
        return graphs

    # -- per-request state -----------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.params.seed is not None:
            g = torch.Generator(device=self.device)
            g.manual_seed(request.params.seed)
            self.generators[request.request_id] = g

    def remove_request(self, request_id: str) -> None:
        self.generators.pop(request_id, None)
        self.block_tables.release(request_id)

    # -- execution -------------------------------------------------------------------------
    def build_batch(
        self, sched: SchedulerOutput, previous: LaunchedStep | None = None
    ) -> tuple[StepBatch, list[Request], DeviceInputs | None]:
        """The step's flat batch, the requests whose last row is sampled (in row order), and
        the input ids that come from ``previous`` (still in flight) rather than the host."""
        ids: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        samplers: list[Request] = []
        deferred_rows: list[int] = []
        deferred_from: list[int] = []
        table_rows: list[int] = []
        max_blocks = 0
        row_of = self.block_tables.row_of
        for s in sched.scheduled:
            req = s.request
            n = s.num_new_tokens
            start = req.num_computed_tokens
            end = start + n
            known = req.num_tokens
            if end > known:  # its last input was sampled by the step still running
                if previous is None or end != known + 1:
                    raise RuntimeError(f"request {req.request_id}: input token {start} is unknown")
                if n > 1:
                    ids.extend(req.token_slice(start, known))
                deferred_rows.append(len(ids))
                deferred_from.append(previous.sample_row(req))
                ids.append(0)
            elif n == 1:  # decode: a plain int, no per-request array
                ids.append(req.token_at(start))
            else:
                ids.extend(req.token_slice(start, end))
            table_rows.append(row_of(req))
            if len(req.block_ids) > max_blocks:
                max_blocks = len(req.block_ids)
            query_lens.append(n)
            seq_lens.append(end)
            if s.samples:
                sample_rows.append(len(ids) - 1)
                samplers.append(req)
        batch = StepBatch(
            input_ids=np.asarray(ids, dtype=np.int64),
            query_lens=np.asarray(query_lens, dtype=np.int32),
            seq_lens=np.asarray(seq_lens, dtype=np.int32),
            block_tables=self.block_tables.gather(table_rows, max_blocks),
            sample_rows=np.asarray(sample_rows, dtype=np.int64),
            deferred_rows=np.asarray(deferred_rows, dtype=np.int64),
        )
        deferred = None
        if deferred_rows:
            assert previous is not None and previous.sample is not None
            deferred = DeviceInputs(np.asarray(deferred_from, dtype=np.int64), previous.sample.token_ids)
        return batch, samplers, deferred

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput, previous: LaunchedStep | None = None) -> LaunchedStep:
        """Queue the step's forward and sampling on the device and start copying the sampled
        ids back; returns without waiting for either. ``previous`` is the launched step whose
        sampled ids some of this step's inputs are."""
        batch, samplers, deferred = self.build_batch(sched, previous)
        with self._step_lock:
            if self.leader is None:
                logits = self.run_batch(batch, deferred)
            else:
                logits = self._run_with_workers(batch, deferred)
            if logits is None:
                return LaunchedStep([], None)
            sampling = SamplingBatch.from_requests(
                samplers,
                logits.shape[-1],
                self.device,
                [self.generators.get(r.request_id) for r in samplers],
            )
            sample = self.sampler.sample(logits, sampling)
            sample.start_copy()
        wait_for_copy = self._wait_watching_workers if self.leader is not None else None
        return LaunchedStep(samplers, sample, wait_for_copy)

    def _run_with_workers(self, batch: StepBatch, deferred: DeviceInputs | None) -> torch.Tensor | None:
        """Rank 0's half of a tensor-parallel step. Any failure once the batch is out leaves
        the ranks out of step (or one of them gone): the engine cannot go on."""
        assert self.leader is not None and self.group is not None
        self.check_alive()
        try:
            with self._on_device():
                self.group.send_step(batch)
                return self.run_batch(batch, deferred)
        except Exception as exc:
            raise EngineDeadError(self.leader.step_failed(exc)) from exc

    def _wait_watching_workers(self, event: torch.cuda.Event) -> None:
        """Rank 0 waits for a step's sampled ids while watching the workers. A collective whose
        peer died never finishes, and NCCL's abort may not free it either: a blocking
        synchronize would hold the engine thread for good, so this polls and raises
        EngineDeadError instead."""
        assert self.leader is not None
        try:
            pause = _STEP_POLL_FIRST_S
            while not event.query():
                self.check_alive()
                time.sleep(pause)
                pause = min(2 * pause, _STEP_POLL_MAX_S)
            self.check_alive()  # an aborted collective also ends its kernels
        except EngineDeadError:
            raise
        except Exception as exc:  # a failed collective surfaces at the first sync after it
            raise EngineDeadError(self.leader.step_failed(exc)) from exc

    def _deferred_ids(
        self, deferred: DeviceInputs | None, taken_rows: torch.Tensor | None, n: int
    ) -> torch.Tensor:
        """The ids the previous step sampled, for this step's deferred rows. Rank 0 picks them
        from its sampled ids; with tensor parallelism it broadcasts them to the other ranks on
        the device, in stream order, so no rank's host waits for them."""
        if deferred is not None:
            assert taken_rows is not None
            ids = deferred.sampled.index_select(0, taken_rows)
        else:
            if self.group is None or self.rank == 0:
                raise RuntimeError("a step with deferred input ids needs the previous step's sample")
            ids = torch.empty(n, dtype=torch.int64, device=self.device)
        if self.group is not None:
            self.group.broadcast_from_rank0(ids)
        return ids

    def _on_device(self) -> AbstractContextManager[object]:
        """Kernels and NCCL calls use the thread's current device, and the engine thread is not
        the one that loaded the model."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext()

    @torch.inference_mode()
    def run_batch(self, batch: StepBatch, deferred: DeviceInputs | None = None) -> torch.Tensor | None:
        """The forward every rank runs for a step: fp32 logits of the sampled rows (None when
        the step samples nothing). ``deferred`` (rank 0) fills the input ids the host does not
        know yet."""
        positions = batch.positions()
        host = [
            batch.slot_mapping(positions, self.block_size), batch.query_start_loc(),
            batch.seq_lens, batch.block_tables, batch.input_ids, positions, batch.sample_rows,
            batch.deferred_rows,
        ]
        if deferred is not None:
            host.append(deferred.sample_rows)
        slots, starts, seq_lens, tables, input_ids, positions_t, sample_rows, deferred_rows, *taken = (
            arrays_to_device(host, self.device)
        )
        taken_rows = taken[0] if taken else None  # device copy of deferred.sample_rows
        metadata = AttentionMetadata(
            slot_mapping=slots,
            query_start_loc=starts,
            seq_lens=seq_lens,
            block_tables=tables,
            max_query_len=int(batch.query_lens.max()),
            max_seq_len=int(batch.seq_lens.max()),
            query_lens_cpu=batch.query_lens.tolist(),
            seq_lens_cpu=batch.seq_lens.tolist(),
        )
        if len(batch.deferred_rows):
            input_ids.index_copy_(0, deferred_rows, self._deferred_ids(deferred, taken_rows, len(batch.deferred_rows)))
        if self.decode_graphs is not None and self.decode_graphs.fits(metadata):
            hidden = self.decode_graphs.run(input_ids, positions_t, metadata)
        else:
            with forward_context(metadata, self.kv_caches):
                hidden = self.model(input_ids, positions_t)
        if len(batch.sample_rows) == 0:
            return None
        return self.model.compute_logits(hidden[sample_rows])
