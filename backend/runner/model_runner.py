"""Executes one scheduled step: the scheduler's output in, a launched step out.

The runner coordinates the jobs that each live in a module of their own: the model
(``models/``), the KV cache's size and tensors (``kv_cache.py``), the step's batch
(``batch.py``), decode CUDA graphs (``graphs.py``) and sampling (``sampler.py``). It never
decides who runs.

With tensor parallelism there is one runner per rank, each holding its shard of the model and
of the KV cache. Rank 0's runner (in the engine core) starts the others
(``TensorParallelLeader``) and sends each step's ``StepBatch`` to them; every rank then runs the
same forward (``forward``), and rank 0 alone samples. Input ids that rank 0's device is still
sampling (overlapped scheduling) reach the other ranks by a device-side broadcast inside the
step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from pagedserve.backend.config import EngineConfig
from pagedserve.backend.engine.request import Request, TokenLogprob
from pagedserve.backend.engine.scheduler import SchedulerOutput
from pagedserve.backend.errors import EngineDeadError
from pagedserve.backend.models.loader import LoadedModel, load_model, resolve_dtype
from pagedserve.backend.runner.attention import (
    AttentionMetadata,
    forward_context,
    get_attention_backend,
)
from pagedserve.backend.runner.batch import (
    InFlightTokens,
    StepBatch,
    StepInputs,
    arrays_to_device,
    build_step_inputs,
)
from pagedserve.backend.runner.distributed import LaunchEnv, TensorParallelGroup
from pagedserve.backend.runner.graphs import DecodeGraphs
from pagedserve.backend.runner.kv_cache import KVCacheShape, num_kv_blocks
from pagedserve.backend.runner.sampler import DeviceSample, Sampler, uses_kernel
from pagedserve.backend.runner.tp_leader import TensorParallelLeader

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
class SampledTokens:
    """One step's sampled ids (and logprobs), in the order of ``SchedulerOutput.samplers``."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


@dataclass
class LaunchedStep:
    """A step queued on the device whose sampled ids may still be on their way to the host."""

    sample: DeviceSample | None  # None when the step samples nothing
    # How to wait for the sampled ids' copy to the host (None: a blocking synchronize).
    wait_for_copy: Callable[[torch.cuda.Event], None] | None = None

    def wait(self) -> SampledTokens:
        """Block until this step's sampled ids are on the host."""
        if self.sample is None:
            return SampledTokens([], [])
        out = self.sample.to_host(self.wait_for_copy)
        return SampledTokens(out.token_ids, out.logprobs)


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
            # The other ranks failed too or wait for a load that will not come: no goodbye.
            self.shutdown(graceful=False)
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
        m = self.model
        self.kv_shape = KVCacheShape(
            m.num_layers, self.block_size, m.num_kv_heads, m.head_dim, self.dtype, self.device
        )
        self.num_blocks = num_kv_blocks(
            self.kv_shape, config.cache, self.max_model_len, self._profile_step
        )
        if group is not None:  # every rank must hold the same block count
            self.num_blocks = group.all_reduce_min(self.num_blocks)
        self.kv_caches = self.kv_shape.allocate(self.num_blocks)
        # One slot per block-table row (the block manager's table has max_num_seqs rows).
        self.in_flight = InFlightTokens(config.scheduler.max_num_seqs, self.device)
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

    def shutdown(self, graceful: bool = True) -> None:
        """Stop the other ranks (rank 0); a no-op without tensor parallelism. ``graceful``
        tells them over the step channel first (only when they are all there and idle)."""
        if self.leader is None:
            return
        idle = self._step_lock.acquire(timeout=_SHUTDOWN_STEP_WAIT_S)
        try:
            if idle:  # a step still running may be replaying a graph
                self.release_decode_graphs()
            self.leader.shutdown(graceful=idle and graceful)
        finally:
            if idle:
                self._step_lock.release()

    # -- loading helpers -------------------------------------------------------------------
    @torch.inference_mode()
    def _profile_step(self) -> None:
        """One forward of max_num_batched_tokens prompt tokens plus sampling max_num_seqs rows,
        on a throwaway cache, to measure peak activation memory."""
        sched = self.config.scheduler
        n = sched.max_num_batched_tokens
        caches = self.kv_shape.allocate(-(-n // self.block_size))
        dev = self.device
        metadata = AttentionMetadata.single_prefill(n, self.block_size, dev)
        ids = torch.zeros(n, dtype=torch.int64, device=dev)
        with forward_context(metadata, caches):
            hidden = self.model(ids, torch.arange(n, device=dev))
        rows = min(sched.max_num_seqs, n)
        logits = self.model.compute_logits(hidden[:rows])
        logits.sort(dim=-1, descending=True)  # top-k/top-p filtering's largest temporary
        torch.cuda.synchronize(dev)
        del caches, hidden, logits

    def _run_model(
        self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> torch.Tensor:
        """The one call of the model's forward over the engine's KV cache."""
        with forward_context(metadata, self.kv_caches):
            return self.model(input_ids, positions)

    def _capture_decode_graphs(self) -> DecodeGraphs:
        from pagedserve.kernels.paged_attention import choose_num_kv_splits

        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        kv_heads = self.model.num_kv_heads
        max_len = self.max_model_len
        graphs = DecodeGraphs(
            self._run_model,
            self.attn_backend,  # type: ignore[arg-type]  # the Triton backend on CUDA
            max_num_seqs=self.config.scheduler.max_num_seqs,
            max_model_len=max_len,
            block_size=self.block_size,
            device=self.device,
            kv_splits_for=lambda size: choose_num_kv_splits(size, kv_heads, max_len, sms),
        )
        graphs.capture()
        return graphs

    # -- execution -------------------------------------------------------------------------
    def release(self, request: Request) -> None:
        """Forget a finished request's sampling state (its token-history row). A step already
        queued may still sample it; whatever it writes is overwritten before reuse."""
        self.sampler.release(request)

    def generator_for(self, seed: int | None) -> torch.Generator | None:
        """A request's own generator when it has a seed (same tokens whatever the batch). The
        Triton sampler keys its counters by the seed instead and needs none."""
        if seed is None or uses_kernel(self.device):
            return None
        return torch.Generator(device=self.device).manual_seed(seed)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> LaunchedStep:
        """Queue the step's forward and sampling on the device and start copying the sampled
        ids back; returns without waiting for either."""
        inputs = build_step_inputs(sched)
        samplers = sched.samplers
        with self._step_lock:
            if self.leader is None:
                logits, sample_slots = self._forward(inputs.batch, inputs)
            else:
                logits, sample_slots = self._forward_with_workers(inputs)
            if logits is None:
                return LaunchedStep(None)
            assert sample_slots is not None  # rank 0 always has them
            sampling = self.sampler.batch(samplers, logits.shape[-1], self.device)
            sample = self.sampler.sample(logits, sampling)
            self.in_flight.store(sample_slots, sample.token_ids)
            sample.start_copy()
        wait_for_copy = self._wait_watching_workers if self.leader is not None else None
        return LaunchedStep(sample, wait_for_copy)

    def _forward_with_workers(
        self, inputs: StepInputs
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Rank 0's half of a tensor-parallel step. Any failure once the batch is out leaves
        the ranks out of step (or one of them gone): the engine cannot go on."""
        assert self.leader is not None and self.group is not None
        self.check_alive()
        try:
            with self._on_device():
                self.group.send_step(inputs.batch)
                return self._forward(inputs.batch, inputs)
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

    def _on_device(self) -> AbstractContextManager[object]:
        """Kernels and NCCL calls use the thread's current device, and the engine thread is not
        the one that loaded the model."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext()

    @torch.inference_mode()
    def forward(self, batch: StepBatch) -> None:
        """A worker's share of a step (ranks > 0): the same forward as rank 0, no sampling."""
        self._forward(batch, None)

    def _forward(
        self, batch: StepBatch, inputs: StepInputs | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The forward every rank runs for a step: fp32 logits of the sampled rows (None when
        the step samples nothing) and, on rank 0 (``inputs`` given), the device copy of the
        samplers' in-flight slots."""
        positions = batch.positions()
        host = [
            batch.slot_mapping(positions, self.block_size), batch.query_start_loc(),
            batch.seq_lens, batch.block_tables, batch.input_ids, positions, batch.sample_rows,
            batch.in_flight_rows,
        ]
        if inputs is not None:
            host += [inputs.in_flight_slots, inputs.sample_slots]
        (
            slots, starts, seq_lens, tables, input_ids, positions_t, sample_rows, in_flight_rows,
            *rank0,
        ) = arrays_to_device(host, self.device)
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
        if len(batch.in_flight_rows):
            input_ids.index_copy_(0, in_flight_rows, self._in_flight_ids(rank0, len(batch.in_flight_rows)))
        if self.decode_graphs is not None and self.decode_graphs.fits(metadata):
            hidden = self.decode_graphs.run(input_ids, positions_t, metadata)
        else:
            hidden = self._run_model(input_ids, positions_t, metadata)
        sample_slots = rank0[1] if rank0 else None
        if len(batch.sample_rows) == 0:
            return None, sample_slots
        return self.model.compute_logits(hidden[sample_rows]), sample_slots

    def _in_flight_ids(self, rank0: list[torch.Tensor], n: int) -> torch.Tensor:
        """The ids the previous step sampled, for this step's in-flight inputs. Rank 0 reads
        them from its in-flight slots; with tensor parallelism it broadcasts them to the other
        ranks on the device, in stream order, so no rank's host waits for them."""
        if rank0:
            ids = self.in_flight.load(rank0[0])
        elif self.group is None or self.rank == 0:
            raise RuntimeError("a step with in-flight inputs needs rank 0's slots")
        else:
            ids = torch.empty(n, dtype=torch.int64, device=self.device)
        if self.group is not None:
            self.group.broadcast_from_rank0(ids)
        return ids
