"""Ranks 1..N-1 of a tensor-parallel engine: load a shard, then run every step rank 0 sends.

A worker has no scheduler and serves no RPCs. It takes its whole configuration from rank 0
through the rendezvous store, joins the process group, loads its shard and loops: receive a
step, run the same forward as rank 0 (its share of every all-reduce and all-gather), until
rank 0 says to stop. On other nodes workers are started as ``pagedserve worker`` with
torch.distributed's environment variables; rank 0 starts the ones on its own host the same way
(``python -m pagedserve.backend.runner.worker``, a fresh interpreter that never re-runs the
caller's main script, as multiprocessing's spawn would).

A worker never outlives its engine: a local one exits when its parent process is gone, and
every one exits when rank 0's store or sockets go away.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, NoReturn

from pagedserve.backend.config import ParallelConfig
from pagedserve.backend.errors import ModelLoadError

# torch and the runner are imported where used, so `pagedserve --help` stays light.

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]

# Named explicitly: rank 0 runs this module as __main__.
logger = logging.getLogger("pagedserve.backend.runner.worker")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Exit codes: the step loop failed; rank 0 went away (parent gone, store unreachable).
EXIT_FAILED = 1
EXIT_LOST_RANK0 = 3
EXIT_USAGE = 2


@dataclass(frozen=True)
class WorkerSpec:
    """Where a worker finds rank 0 and who it is; everything else comes from rank 0."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int
    local_rank: int
    # Bound on reaching rank 0's store and reading its config.
    timeout_s: float
    # The model directory on this node, when it differs from rank 0's path.
    model: str | None = None
    # Local workers: exit as soon as this process (rank 0) is gone.
    parent_pid: int | None = None


class _Lifeline(threading.Thread):
    """Beats the worker's heartbeat in rank 0's store and checks that rank 0 is still there;
    when it is not, ends the process (the main thread may be blocked in a collective)."""

    def __init__(self, spec: WorkerSpec, interval_s: float) -> None:
        super().__init__(name="pagedserve-tp-lifeline", daemon=True)
        self._spec = spec
        self._interval_s = interval_s
        self.stop = threading.Event()

    def run(self) -> None:
        from pagedserve.backend.runner.distributed import HEARTBEAT, connect_store

        spec = self._spec
        key = f"{HEARTBEAT}/{spec.rank}"
        try:
            store = connect_store(
                spec.master_addr, spec.master_port, spec.world_size,
                timedelta(seconds=spec.timeout_s),
            )
            while not self.stop.is_set():
                if spec.parent_pid is not None and os.getppid() != spec.parent_pid:
                    self._lost(f"parent process {spec.parent_pid} is gone")
                store.add(key, 1)
                self.stop.wait(self._interval_s)
        except Exception as exc:  # the store lives in rank 0: unreachable means rank 0 is gone
            if not self.stop.is_set():
                self._lost(f"rank 0's store is unreachable: {exc}")

    def _lost(self, why: str) -> None:
        logger.error("rank %d: %s; exiting", self._spec.rank, why)
        _flush_logs()
        os._exit(EXIT_LOST_RANK0)


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()


def run_worker(spec: WorkerSpec) -> int:
    """The worker's life; returns its exit code (0 after rank 0 said to stop)."""
    from pagedserve.backend.runner.distributed import (
        CONFIG_KEY,
        TensorParallelGroup,
        connect_store,
        decode_config,
    )
    from pagedserve.backend.runner.model_runner import ModelRunner, rank_device

    timeout = timedelta(seconds=spec.timeout_s)
    store = connect_store(spec.master_addr, spec.master_port, spec.world_size, timeout)
    config = decode_config(store.get(CONFIG_KEY))
    if spec.model is not None:
        config.model.model = spec.model
    if config.parallel.tensor_parallel_size != spec.world_size:
        raise ValueError(
            f"rank 0 runs tensor_parallel_size {config.parallel.tensor_parallel_size}, "
            f"this worker was started for a world of {spec.world_size}"
        )
    lifeline = _Lifeline(spec, config.parallel.worker_heartbeat_interval_s)
    lifeline.start()
    device = rank_device(config.model.device, spec.local_rank)
    group = TensorParallelGroup.join(
        rank=spec.rank,
        world_size=spec.world_size,
        store=store,
        device=device,
        timeout=timedelta(seconds=config.parallel.distributed_timeout_s),
    )
    runner = ModelRunner(config, group=group, device=device)
    logger.info("rank %d ready on %s", spec.rank, device)
    while True:
        batch = group.receive_step()
        if batch is None:
            break
        runner.forward(batch)
    lifeline.stop.set()
    runner.release_decode_graphs()
    group.destroy(wait_s=config.parallel.distributed_timeout_s)
    logger.info("rank %d stopped", spec.rank)
    return 0


def _run_guarded(spec: WorkerSpec) -> int:
    try:
        return run_worker(spec)
    except ModelLoadError as exc:  # rank 0 has the cause too and reports it in one line
        logger.error("tensor-parallel rank %d failed to load: %s", spec.rank, exc)
        logger.debug("the load's traceback", exc_info=exc)
        _flush_logs()
        os._exit(EXIT_FAILED)
    except Exception:
        logger.exception("tensor-parallel rank %d failed", spec.rank)
        _flush_logs()
        # Skip interpreter teardown: a process group broken mid-collective can abort in it.
        os._exit(EXIT_FAILED)


# -- `pagedserve worker` ------------------------------------------------------------------------
def worker_command(args: argparse.Namespace) -> int:
    from pagedserve.backend.runner.distributed import LaunchEnv

    logging.basicConfig(level=args.log_level, format=LOG_FORMAT)
    if args.parent_pid is not None:
        # Ctrl-C reaches the whole process group; rank 0 alone decides when its workers stop.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        env = LaunchEnv.from_environ()
        if env is None:
            raise ValueError(
                "pagedserve worker needs MASTER_ADDR, MASTER_PORT, WORLD_SIZE and RANK "
                "(rank 0 is `pagedserve serve --tensor-parallel-size N` with the same variables)"
            )
        if env.rank < 1 or env.rank >= env.world_size:
            raise ValueError(
                f"RANK must be in [1, WORLD_SIZE) for a worker, got {env.rank} of {env.world_size}"
            )
        if args.tensor_parallel_size is not None and args.tensor_parallel_size != env.world_size:
            raise ValueError(
                f"--tensor-parallel-size {args.tensor_parallel_size} differs from "
                f"WORLD_SIZE {env.world_size}"
            )
    except ValueError as exc:
        print(f"pagedserve worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    spec = WorkerSpec(
        rank=env.rank,
        world_size=env.world_size,
        master_addr=env.master_addr,
        master_port=env.master_port,
        local_rank=env.local_rank if env.local_rank is not None else env.rank,
        timeout_s=args.distributed_timeout_s,
        model=args.model,
        parent_pid=args.parent_pid,
    )
    return _run_guarded(spec)


def add_worker_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="the model directory on this node (default: rank 0's path)",
    )
    parser.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=None,
        help="checked against WORLD_SIZE",
    )
    parser.add_argument(
        "--distributed-timeout-s",
        type=float,
        default=ParallelConfig.distributed_timeout_s,
        help="how long to wait for rank 0's store",
    )
    parser.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="exit as soon as this process is gone (rank 0 passes its own pid to the workers "
        "it starts on its host)",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=LOG_LEVELS,
        help="DEBUG also logs the traceback of a failure",
    )


def register_worker(sub: SubParsers) -> None:
    parser = sub.add_parser(
        "worker",
        help="run one tensor-parallel rank > 0 for a `pagedserve serve` on another node",
        description=(
            "Join the tensor-parallel group of rank 0 (`pagedserve serve "
            "--tensor-parallel-size N`) through MASTER_ADDR, MASTER_PORT, WORLD_SIZE and RANK. "
            "The engine configuration comes from rank 0."
        ),
    )
    add_worker_args(parser)
    parser.set_defaults(func=worker_command)


def main(argv: list[str] | None = None) -> NoReturn:
    """``python -m pagedserve.backend.runner.worker``: how rank 0 starts workers on its host."""
    parser = argparse.ArgumentParser(prog="pagedserve worker")
    add_worker_args(parser)
    code = worker_command(parser.parse_args(argv))
    _flush_logs()
    # Skip interpreter teardown: the process group is gone and nothing else needs cleaning.
    os._exit(code)


if __name__ == "__main__":
    main()
