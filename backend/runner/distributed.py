"""Process-group plumbing for tensor parallelism: rendezvous, the step channel, the load barrier.

All ranks meet through one TCPStore served by rank 0: on 127.0.0.1 when rank 0 spawns its
workers, at MASTER_ADDR:MASTER_PORT when they are started elsewhere. Its keys:

    config            rank 0's EngineConfig as JSON: the workers' whole configuration
    joined/<rank>     set by a rank just before it joins the process group
    loaded/<rank>     empty once the rank's shard is loaded, else why it could not load
    heartbeat/<rank>  a counter the rank's heartbeat thread increments

Model collectives (the row-parallel all-reduce, the vocabulary all-gather) run on the default
process group: NCCL on CUDA, gloo on CPU. Rank 0's per-step message travels over gloo (the
default group on CPU, a second group on CUDA) as two int64 broadcasts, header then payload. An
idle worker waits for the next header without a time limit, since a server may sit idle for
hours; a dead rank 0 closes its sockets, which ends that wait at once.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields, is_dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from pagedserve.backend.config import EngineConfig
from pagedserve.backend.errors import ModelLoadError
from pagedserve.backend.runner.batch import HEADER_LEN, StepBatch

logger = logging.getLogger(__name__)

ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")
CONFIG_KEY = "config"
JOINED = "joined"
LOADED = "loaded"
HEARTBEAT = "heartbeat"

# Message kinds, the first value of every header.
_STEP = 1
_SHUTDOWN = 2
# "No limit" for an idle worker's wait (gloo needs a finite timeout; this is decades).
_IDLE_WAIT = timedelta(days=10_000)
# How often a rank polls the store while it waits for the others.
_POLL_S = 0.05


@dataclass(frozen=True)
class LaunchEnv:
    """torch.distributed's launch variables: set when ranks are started across nodes."""

    master_addr: str
    master_port: int
    world_size: int
    rank: int
    local_rank: int | None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> LaunchEnv | None:
        """None when none of the variables is set; ValueError when only some are."""
        env = os.environ if environ is None else environ
        if not any(env.get(key) for key in ENV_KEYS):
            return None
        missing = [key for key in ENV_KEYS if not env.get(key)]
        if missing:
            raise ValueError(
                f"incomplete torch.distributed environment: {', '.join(missing)} not set "
                f"(set all of {', '.join(ENV_KEYS)}, or none to spawn workers locally)"
            )
        try:
            local = env.get("LOCAL_RANK")
            return cls(
                master_addr=env["MASTER_ADDR"],
                master_port=int(env["MASTER_PORT"]),
                world_size=int(env["WORLD_SIZE"]),
                rank=int(env["RANK"]),
                local_rank=int(local) if local else None,
            )
        except ValueError as exc:
            raise ValueError(f"invalid torch.distributed environment: {exc}") from exc


def encode_config(config: EngineConfig) -> bytes:
    """The config as flat JSON (``EngineConfig.from_kwargs`` names): plain data, so a worker
    never unpickles what it reads from the network."""
    flat: dict[str, object] = {}
    for section in config.sections():
        for f in fields(section):
            value = getattr(section, f.name)
            if not is_dataclass(value):
                flat[f.name] = str(value) if isinstance(value, Path) else value
    return json.dumps(flat).encode()


def decode_config(data: bytes) -> EngineConfig:
    return EngineConfig.from_kwargs(**json.loads(data))


def connect_store(
    host: str, port: int, world_size: int, timeout: timedelta, *, is_master: bool = False
) -> dist.TCPStore:
    """The rendezvous store: rank 0 serves it (``port=0`` picks a free one), others connect,
    retrying until ``timeout`` so workers may start before rank 0."""
    return dist.TCPStore(
        host, port, world_size, is_master, timeout=timeout, wait_for_workers=False
    )


def wait_for_ranks(
    store: dist.Store,
    prefix: str,
    ranks: Iterable[int],
    timeout_s: float,
    check_alive: Callable[[], None],
    what: str,
) -> dict[int, bytes]:
    """Poll until every rank has set ``prefix/<rank>``; returns the values.

    ``check_alive`` runs between polls and raises if a rank died, so a crashed worker fails the
    wait at once rather than after the timeout.
    """
    pending = sorted(set(ranks))
    deadline = time.monotonic() + timeout_s
    while True:
        pending = [r for r in pending if not store.check([f"{prefix}/{r}"])]
        if not pending:
            break
        check_alive()
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"ranks {pending} did not {what} within {timeout_s:.0f} s "
                "(parallel.distributed_timeout_s)"
            )
        time.sleep(_POLL_S)
    return {r: store.get(f"{prefix}/{r}") for r in sorted(set(ranks))}


class TensorParallelGroup:
    """One rank's membership: its process groups, the store, and the step channel."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        store: dist.Store,
        timeout: timedelta,
        control: dist.ProcessGroup,
        backend: str,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.store = store
        self.timeout = timeout
        self.control = control
        self.backend = backend
        self._teardown_lock = threading.Lock()
        self._aborted: threading.Event | None = None

    @classmethod
    def join(
        cls,
        *,
        rank: int,
        world_size: int,
        store: dist.Store,
        device: torch.device,
        timeout: timedelta,
    ) -> TensorParallelGroup:
        """Join the default process group (NCCL on CUDA, gloo on CPU) and the gloo channel."""
        backend = "nccl" if device.type == "cuda" else "gloo"
        # torch's stub declares str values; the binding takes bytes as well.
        store.set(f"{JOINED}/{rank}", b"")  # type: ignore[arg-type]
        dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
        if backend == "gloo":
            control = dist.group.WORLD
        else:
            control = dist.new_group(backend="gloo", timeout=timeout)
        assert control is not None
        return cls(rank, world_size, store, timeout, control, backend)

    # -- the step channel ------------------------------------------------------------------------
    def send_step(self, batch: StepBatch | None) -> None:
        """Rank 0: the next step's batch to every other rank (None: shut down)."""
        header = torch.zeros(1 + HEADER_LEN, dtype=torch.int64)
        header[0] = _SHUTDOWN if batch is None else _STEP
        if batch is not None:
            header[1:] = torch.from_numpy(batch.header())
        self._broadcast(header, self.timeout)
        if batch is not None:
            self._broadcast(torch.from_numpy(batch.payload()), self.timeout)

    def receive_step(self) -> StepBatch | None:
        """Other ranks: block until rank 0 sends a step; None when it says to shut down."""
        header = torch.empty(1 + HEADER_LEN, dtype=torch.int64)
        self._broadcast(header, _IDLE_WAIT)
        kind = int(header[0])
        if kind == _SHUTDOWN:
            return None
        if kind != _STEP:
            raise RuntimeError(f"unknown message kind {kind} from rank 0")
        dims = header[1:].numpy()
        payload = torch.empty(StepBatch.payload_len(dims), dtype=torch.int64)
        self._broadcast(payload, self.timeout)
        return StepBatch.unpack(dims, payload.numpy())

    def _broadcast(self, tensor: torch.Tensor, timeout: timedelta) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        opts.rootTensor = 0
        opts.timeout = timeout
        self.control.broadcast([tensor], opts).wait()

    def broadcast_from_rank0(self, tensor: torch.Tensor) -> None:
        """Rank 0's ``tensor`` into every rank's, over the model's group (NCCL on CUDA: queued
        on the device in stream order, the host does not wait)."""
        dist.broadcast(tensor, src=0)

    def all_reduce_min(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())

    # -- loading -------------------------------------------------------------------------------
    def report_loaded(self, error: BaseException | None) -> None:
        message = "" if error is None else f"{type(error).__name__}: {error}"
        # torch's stub declares str values; the binding takes bytes as well.
        self.store.set(f"{LOADED}/{self.rank}", message.encode())  # type: ignore[arg-type]

    def wait_loaded(self, check_alive: Callable[[], None]) -> None:
        """Wait for every rank's load report; ModelLoadError naming the ranks that failed."""
        try:
            statuses = wait_for_ranks(
                self.store,
                LOADED,
                range(self.world_size),
                self.timeout.total_seconds(),
                check_alive,
                "load the model",
            )
        except TimeoutError as exc:
            raise ModelLoadError(str(exc)) from exc
        failed = {r: s.decode() for r, s in statuses.items() if s}
        if failed:
            raise ModelLoadError(
                "; ".join(
                    f"tensor-parallel rank {r} failed to load: {m}" for r, m in failed.items()
                )
            )

    # -- teardown ------------------------------------------------------------------------------
    def abort(self, wait_s: float) -> bool:
        """Make collectives stuck on a dead rank fail. NCCL only: gloo notices a closed peer by
        itself, while an NCCL kernel would wait for the watchdog's timeout. NCCL's abort may
        itself block (it reclaims resources shared with the other ranks, and a dead rank never
        takes part), so it runs once, on its own thread; returns whether it has finished
        within ``wait_s`` (0: start it and return)."""
        if self.backend != "nccl":
            return True
        with self._teardown_lock:
            if self._aborted is None:
                group = dist.group.WORLD
                assert group is not None
                self._aborted = _start(group.abort, "aborting the NCCL communicators")
        return _wait(self._aborted, "aborting the NCCL communicators", wait_s)

    def destroy(self, wait_s: float) -> bool:
        """Leave the process groups. NCCL's teardown is collective (it flushes work shared with
        the other ranks): every rank must call this at about the same time, rank 0 right after
        telling the workers to stop and the workers on reading that. A rank that never arrives
        would hang the others, so this waits at most ``wait_s``; returns whether it finished."""
        if not dist.is_initialized():
            return True
        what = "destroying the process group"
        return _wait(_start(dist.destroy_process_group, what), what, wait_s)


def _start(action: Callable[[], object], what: str) -> threading.Event:
    """Run ``action`` on a daemon thread; the event is set when it returns. A call left blocked
    in the communication library then blocks that thread, not the caller's."""
    done = threading.Event()

    def run() -> None:
        try:
            action()
        except Exception:  # best effort: a group broken by a dead rank may not tear down cleanly
            logger.warning("%s failed", what, exc_info=True)
        finally:
            done.set()

    threading.Thread(target=run, name="pagedserve-tp-teardown", daemon=True).start()
    return done


def _wait(done: threading.Event, what: str, wait_s: float) -> bool:
    if wait_s <= 0:
        return done.is_set()
    if not done.wait(wait_s):
        logger.warning("%s did not finish within %.0f s; going on without it", what, wait_s)
        return False
    return True


def heartbeat_counts(store: dist.Store, ranks: Iterable[int]) -> dict[int, int]:
    """Current heartbeat counters (``add(key, 0)`` reads without waiting for a missing key)."""
    return {r: int(store.add(f"{HEARTBEAT}/{r}", 0)) for r in ranks}
