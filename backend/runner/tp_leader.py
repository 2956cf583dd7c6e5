"""Rank 0's side of tensor parallelism: start or await the workers, watch them, stop them.

``TensorParallelLeader.launch`` starts ranks 1..N-1 on this host (each a fresh
``python -m pagedserve.backend.runner.worker`` with torch.distributed's variables pointing at
rank 0), or, when those variables are already set, serves the rendezvous store at
MASTER_ADDR:MASTER_PORT and waits for ``pagedserve worker`` processes started elsewhere.

Once the engine is up, a monitor thread watches the workers (a local process exiting, any
worker's heartbeat going silent). The first death marks the leader dead, stops the other local
workers, aborts collectives that would wait for the dead rank, and tells the listeners, so the
engine fails its requests at once instead of hanging on a collective that can never finish.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import wait as wait_for_fds

import torch
import torch.distributed as dist

from pagedserve.backend.config import EngineConfig
from pagedserve.backend.errors import ModelLoadError
from pagedserve.backend.runner.distributed import (
    CONFIG_KEY,
    JOINED,
    LaunchEnv,
    TensorParallelGroup,
    connect_store,
    encode_config,
    heartbeat_counts,
    wait_for_ranks,
)
from pagedserve.backend.runner.worker import LOG_LEVELS

logger = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
# How long stopping workers get to exit by themselves, then after SIGTERM, before SIGKILL.
_EXIT_GRACE_S = 10.0
_TERM_GRACE_S = 5.0
# After a failed collective: how long a worker's exit may take to show, and the poll interval.
_EXIT_REGISTER_S = 1.0
_POLL_S = 0.01

DeathListener = Callable[[str], None]


def _abandon(processes: list[subprocess.Popen[bytes]], stopping: threading.Event) -> None:
    """Exit-time cleanup of a leader nobody shut down: the workers' end is expected."""
    stopping.set()
    _stop_processes(processes, 0.0)


def _stop_processes(processes: list[subprocess.Popen[bytes]], grace_s: float) -> None:
    """Wait up to ``grace_s`` for the processes to exit, then SIGTERM, then SIGKILL."""
    deadline = time.monotonic() + grace_s
    for p in processes:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.terminate()
    for p in processes:
        try:
            p.wait(_TERM_GRACE_S)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _exit_fds(processes: list[subprocess.Popen[bytes]]) -> list[int]:
    """pidfds that become readable when the processes exit (Linux), else none (poll instead)."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return []
    try:
        return [pidfd_open(p.pid) for p in processes]
    except OSError:
        return []


class TensorParallelLeader:
    def __init__(self, config: EngineConfig, store: dist.TCPStore) -> None:
        parallel = config.parallel
        self.world_size = parallel.tensor_parallel_size
        self.timeout = timedelta(seconds=parallel.distributed_timeout_s)
        self._heartbeat_interval_s = parallel.worker_heartbeat_interval_s
        self._heartbeat_timeout_s = parallel.worker_heartbeat_timeout_s
        self._store = store  # rank 0 serves the store: it lives as long as the leader
        self._processes: list[subprocess.Popen[bytes]] = []
        self.group: TensorParallelGroup | None = None
        self.dead_reason: str | None = None
        self._listeners: list[DeathListener] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None
        self._closed = False
        # Local workers must not outlive this object, even if nobody calls shutdown().
        self._finalizer = weakref.finalize(self, _abandon, self._processes, self._stopping)

    # -- start -----------------------------------------------------------------------------------
    @classmethod
    def launch(cls, config: EngineConfig, device: torch.device) -> TensorParallelLeader:
        """Start (or await) the workers and join the process group as rank 0."""
        world = config.parallel.tensor_parallel_size
        timeout = timedelta(seconds=config.parallel.distributed_timeout_s)
        if dist.is_initialized():
            raise ModelLoadError(
                "this process already belongs to a torch.distributed group (another "
                "tensor-parallel engine?): shut that down first"
            )
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
            raise ModelLoadError(
                f"cannot serve the rendezvous store on port {port}: {exc}"
            ) from exc
        # torch's stub declares str values; the binding takes bytes as well.
        store.set(CONFIG_KEY, encode_config(config))  # type: ignore[arg-type]
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
            # Watch from here on: a worker dying while loading must not leave rank 0 waiting
            # in a collective until the timeout.
            leader._start_monitor()
        except BaseException as exc:
            leader.shutdown(graceful=False)
            if isinstance(exc, TimeoutError | RuntimeError):
                raise ModelLoadError(f"tensor-parallel start failed: {exc}") from exc
            raise
        return leader

    def _spawn_local(self, config: EngineConfig, port: int) -> None:
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        command = [
            sys.executable, "-m", "pagedserve.backend.runner.worker",
            "--parent-pid", str(os.getpid()),
            "--distributed-timeout-s", str(config.parallel.distributed_timeout_s),
            "--log-level", level if level in LOG_LEVELS else "INFO",
        ]
        for rank in range(1, self.world_size):
            env = {
                **os.environ,
                "MASTER_ADDR": LOCALHOST,
                "MASTER_PORT": str(port),
                "WORLD_SIZE": str(self.world_size),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
            }
            self._processes.append(subprocess.Popen(command, env=env))
        logger.info(
            "spawned tensor-parallel workers: %s",
            ", ".join(f"rank {r} pid {p.pid}" for r, p in enumerate(self._processes, 1)),
        )

    @property
    def worker_pids(self) -> list[int]:
        """Pids of the workers this process spawned (none when they run elsewhere)."""
        return [p.pid for p in self._processes]

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
            code = p.poll()
            if code is not None:
                return f"tensor-parallel rank {rank} (pid {p.pid}) exited with code {code}"
        return None

    def step_failed(self, error: BaseException) -> str:
        """A collective failed on rank 0: mark the group dead and return why, naming the local
        worker that exited when there is one (its exit may take a moment to register)."""
        deadline = time.monotonic() + _EXIT_REGISTER_S
        reason = self.dead_reason or self._exited_process()
        while reason is None and self._processes and time.monotonic() < deadline:
            time.sleep(_POLL_S)
            reason = self._exited_process()
        self._declare_dead(reason or f"tensor-parallel step failed: {error}")
        return self.dead_reason or str(error)

    def _start_monitor(self) -> None:
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
        exit_fds = _exit_fds(self._processes)
        try:
            self._watch_loop(store, ranks, counts, heard, exit_fds)
        finally:
            for fd in exit_fds:
                os.close(fd)

    def _watch_loop(
        self,
        store: dist.Store,
        ranks: range,
        counts: dict[int, int],
        heard: dict[int, float],
        exit_fds: list[int],
    ) -> None:
        while not self._stopping.is_set():
            if exit_fds:  # wakes at once when a local worker exits
                wait_for_fds(exit_fds, timeout=self._heartbeat_interval_s)
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
        # The group is unusable now: free the other workers' devices, fail the requests, then
        # try to free rank 0's stream. The engine thread does not wait on that abort (it
        # watches dead_reason while a step runs), so the requests fail even if NCCL's abort
        # never returns.
        for p in self._processes:
            if p.poll() is None:
                p.kill()
        for listener in self._listeners:
            try:
                listener(reason)
            except Exception:
                logger.exception("death listener failed")
        if self.group is not None:
            self.group.abort(wait_s=0)

    # -- stop ------------------------------------------------------------------------------------
    def shutdown(self, graceful: bool = True) -> None:
        """Stop every worker. ``graceful``: tell them over the step channel first (only valid
        when no step is in flight); then SIGTERM/SIGKILL whatever is left."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        graceful = graceful and self.dead_reason is None and self.group is not None
        if graceful:
            assert self.group is not None
            try:
                self.group.send_step(None)
            except Exception:
                logger.warning("could not tell the workers to stop", exc_info=True)
                graceful = False
        if graceful:
            assert self.group is not None
            # Now, while the workers destroy theirs: NCCL's teardown is collective.
            graceful = self.group.destroy(wait_s=_EXIT_GRACE_S)
        _stop_processes(self._processes, _EXIT_GRACE_S if graceful else 0.0)
        self._finalizer.detach()
        if self._monitor is not None:
            self._monitor.join()
        if self.group is not None and not graceful:
            # A rank died, or the ranks stopped mid-step or mid-start: no collective teardown
            # can happen now. Abort (NCCL), then leave the groups so that this process can
            # start another engine; both bounded, neither may hang shutdown.
            if self.group.abort(wait_s=_EXIT_GRACE_S):
                self.group.destroy(wait_s=_EXIT_GRACE_S)
        for rank, p in enumerate(self._processes, 1):
            if graceful and p.returncode != 0:
                logger.warning("tensor-parallel rank %d exited with code %s", rank, p.returncode)
