"""Rank 0's side of tensor parallelism: start or await the workers, watch them, stop them.

``TensorParallelLeader.launch`` spawns ranks 1..N-1 on this host, or, when torch.distributed's
environment variables are set, serves the rendezvous store at MASTER_ADDR:MASTER_PORT and waits
for ``pagedserve worker`` processes started elsewhere. Once the engine is up, a monitor thread
watches the workers (a local process exiting, any worker's heartbeat going silent). The first
death marks the leader dead, stops the other local workers, aborts collectives that would wait
for the dead rank, and tells the listeners, so the engine fails its requests at once instead of
hanging on a collective that can never finish.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
import weakref
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import wait as wait_for_sentinels
from multiprocessing.process import BaseProcess

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pagedserve.backend.config import EngineConfig
from pagedserve.backend.errors import ModelLoadError
from pagedserve.backend.runner.distributed import (
    CONFIG_KEY,
    JOINED,
    LaunchEnv,
    TensorParallelGroup,
    connect_store,
    heartbeat_counts,
    wait_for_ranks,
)
from pagedserve.backend.runner.worker import WorkerSpec, run_local_worker

logger = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
# How long stopping workers get to exit by themselves, then after SIGTERM, before SIGKILL.
_EXIT_GRACE_S = 10.0
_TERM_GRACE_S = 5.0

DeathListener = Callable[[str], None]


def _stop_processes(processes: list[BaseProcess], grace_s: float) -> None:
    """Wait up to ``grace_s`` for the processes to exit, then SIGTERM, then SIGKILL."""
    deadline = time.monotonic() + grace_s
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(_TERM_GRACE_S)
        if p.is_alive():
            p.kill()
            p.join()


class TensorParallelLeader:
    def __init__(self, config: EngineConfig, store: dist.TCPStore) -> None:
        parallel = config.parallel
        self.world_size = parallel.tensor_parallel_size
        self.timeout = timedelta(seconds=parallel.distributed_timeout_s)
        self._heartbeat_interval_s = parallel.worker_heartbeat_interval_s
        self._heartbeat_timeout_s = parallel.worker_heartbeat_timeout_s
        self._store = store  # rank 0 serves the store: it lives as long as the leader
        self._processes: list[BaseProcess] = []
        self.group: TensorParallelGroup | None = None
        self.dead_reason: str | None = None
        self._listeners: list[DeathListener] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None
        self._closed = False
        # Local workers must not outlive this object, even if nobody calls shutdown().
        self._finalizer = weakref.finalize(self, _stop_processes, self._processes, 0.0)

    # -- start -----------------------------------------------------------------------------------
    @classmethod
    def launch(cls, config: EngineConfig, device: torch.device) -> "TensorParallelLeader":
        """Start (or await) the workers and join the process group as rank 0."""
        world = config.parallel.tensor_parallel_size
        timeout = timedelta(seconds=config.parallel.distributed_timeout_s)
        try:
            env = LaunchEnv.from_environ()
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from exc
        if env is not None:
            if env.world_size != world:
                raise ModelLoadError(
                    f"WORLD_SIZE is {env.world_size} but tensor_parallel_size is {world}"
                )
            if env.rank != 0:
                raise ModelLoadError(
                    f"RANK is {env.rank}: this process runs the engine and must be rank 0 "
                    "(start ranks > 0 with `pagedserve worker`)"
                )
        elif device.type == "cuda" and torch.cuda.device_count() < world:
            raise ModelLoadError(
                f"tensor_parallel_size {world} needs {world} GPUs on this host, "
                f"found {torch.cuda.device_count()}"
            )
        host, port = (LOCALHOST, 0) if env is None else (env.master_addr, env.master_port)
        try:
            store = connect_store(host, port, world, timeout, is_master=True)
        except RuntimeError as exc:
            raise ModelLoadError(f"cannot serve the rendezvous store on port {port}: {exc}") from exc
        store.set(CONFIG_KEY, pickle.dumps(config))
        leader = cls(config, store)
        try:
            if env is None:
                leader._spawn_local(config, store.port)
            else:
                logger.info(
                    "waiting for %d tensor-parallel workers at %s:%d",
                    world - 1, env.master_addr, store.port,
                )
            wait_for_ranks(
                store,
                JOINED,
                range(1, world),
                timeout.total_seconds(),
                leader.check_processes,
                "join the tensor-parallel group",
            )
            leader.group = TensorParallelGroup.join(
                rank=0, world_size=world, store=store, device=device, timeout=timeout
            )
        except BaseException as exc:
            leader.shutdown(graceful=False)
            if isinstance(exc, TimeoutError | RuntimeError):
                raise ModelLoadError(f"tensor-parallel start failed: {exc}") from exc
            raise
        return leader

    def _spawn_local(self, config: EngineConfig, port: int) -> None:
        context = mp.get_context("spawn")
        level = logging.getLogger().getEffectiveLevel()
        for rank in range(1, self.world_size):
            spec = WorkerSpec(
                rank=rank,
                world_size=self.world_size,
                master_addr=LOCALHOST,
                master_port=port,
                local_rank=rank,
                timeout_s=config.parallel.distributed_timeout_s,
                parent_pid=os.getpid(),
                log_level=level,
            )
            process = context.Process(
                target=run_local_worker, args=(spec,), name=f"pagedserve-tp{rank}", daemon=True
            )
            process.start()
            self._processes.append(process)
        logger.info(
            "spawned tensor-parallel workers: %s",
            ", ".join(f"rank {r} pid {p.pid}" for r, p in enumerate(self._processes, 1)),
        )

    @property
    def worker_pids(self) -> list[int]:
        """Pids of the workers this process spawned (none when they run elsewhere)."""
        return [p.pid for p in self._processes if p.pid is not None]

    # -- liveness --------------------------------------------------------------------------------
    def add_death_listener(self, listener: DeathListener) -> None:
        """``listener(reason)`` runs on the monitor thread when a worker dies."""
        self._listeners.append(listener)

    def check_processes(self) -> None:
        """Raise if a local worker has exited (used while waiting for the group to form)."""
        reason = self._exited_process()
        if reason is not None:
            raise ModelLoadError(reason)

    def _exited_process(self) -> str | None:
        for rank, p in enumerate(self._processes, 1):
            if p.exitcode is not None:
                return f"tensor-parallel rank {rank} (pid {p.pid}) exited with code {p.exitcode}"
        return None

    def start_monitor(self) -> None:
        self._monitor = threading.Thread(
            target=self._watch, name="pagedserve-tp-monitor", daemon=True
        )
        self._monitor.start()

    def _watch(self) -> None:
        ranks = range(1, self.world_size)
        # Its own connection: the store object rank 0 joined with stays with the engine.
        store = connect_store(LOCALHOST, self._store.port, self.world_size, self.timeout)
        counts = heartbeat_counts(store, ranks)
        heard = {r: time.monotonic() for r in ranks}
        sentinels = [p.sentinel for p in self._processes]
        while not self._stopping.is_set():
            if sentinels:
                wait_for_sentinels(sentinels, timeout=self._heartbeat_interval_s)
            else:
                self._stopping.wait(self._heartbeat_interval_s)
            if self._stopping.is_set():
                return
            reason = self._exited_process()
            if reason is None:
                try:
                    now_counts = heartbeat_counts(store, ranks)
                except RuntimeError as exc:
                    reason = f"the rendezvous store failed: {exc}"
                    now_counts = counts
                now = time.monotonic()
                for r in ranks:
                    if now_counts[r] != counts[r]:
                        heard[r] = now
                    elif reason is None and now - heard[r] > self._heartbeat_timeout_s:
                        reason = (
                            f"tensor-parallel rank {r} sent no heartbeat for "
                            f"{self._heartbeat_timeout_s:.0f} s"
                        )
                counts = now_counts
            if reason is not None:
                self._declare_dead(reason)
                return

    def _declare_dead(self, reason: str) -> None:
        with self._lock:
            if self.dead_reason is not None or self._stopping.is_set():
                return
            self.dead_reason = reason
        logger.error("%s; the engine cannot continue", reason)
        # The group is unusable now: free the other workers' devices and unblock rank 0.
        for p in self._processes:
            if p.is_alive():
                p.kill()
        if self.group is not None:
            self.group.abort()
        for listener in self._listeners:
            try:
                listener(reason)
            except Exception:
                logger.exception("death listener failed")

    # -- stop ------------------------------------------------------------------------------------
    def shutdown(self, graceful: bool = True) -> None:
        """Stop every worker. ``graceful``: tell them over the step channel first (only valid
        when no step is in flight); then SIGTERM/SIGKILL whatever is left."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        if graceful and self.dead_reason is None and self.group is not None:
            try:
                self.group.send_step(None)
            except Exception:
                logger.warning("could not tell the workers to stop", exc_info=True)
                graceful = False
        _stop_processes(self._processes, _EXIT_GRACE_S if graceful else 0.0)
        self._finalizer.detach()
        if self._monitor is not None:
            self._monitor.join()
        if self.group is not None:
            self.group.destroy()
        for rank, p in enumerate(self._processes, 1):
            if p.exitcode not in (0, None) and graceful:
                logger.warning("tensor-parallel rank %d exited with code %s", rank, p.exitcode)
