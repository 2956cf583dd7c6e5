"""Typed messages between the engine core and its client, and their encoding on a socket.

The core runs on a thread of the server's process or in a process of its own; either way the
client and the core exchange only the dataclasses below (never bare tuples or strings), in
order, over one channel each way.

client -> core (commands):

    StartEngine(config)            first message to an engine process: what to load
    AddRequest(request)            a validated, admitted Request (admission is the client's)
    AbortRequest(request_id)       finish it now; its final delta comes back in StepOutputs
    Shutdown()                     abort everything, report, stop

core -> client (events):

    EngineReady(model_info, builder, load)   an engine process has loaded
    EngineLoadFailed(error)                  an engine process could not load
    StepOutputs(deltas, step, load)          once per step: deltas (aborts' finals included),
                                             the step for telemetry (None when none ran), load
    EngineFailed(reason)                     nothing more can run: fail every request
    EngineExited()                           an engine process's last message

Encoding (engine process only; a thread passes the objects themselves). Each message is one
frame of ``multiprocessing.connection`` bytes: ``pickle((WIRE_VERSION, message))`` where a
``StepOutputs`` is first flattened into ``_StepOutputsWire``: mid-stream deltas without logprobs
(almost all of them) as three columns (ids, texts, token-id lists), every other delta whole.
That keeps a 256-request step's frame cheap to write (see BENCHMARKS.md: the engine process's
pickling once cost a tenth of the step). A frame of another version is refused: both ends come
from one installation, so a mismatch is a bug, not a peer to negotiate with. Bump
``WIRE_VERSION`` when any message's fields change.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pagedserve.backend.engine.request import Request, RequestOutputDelta

if TYPE_CHECKING:
    from pagedserve.backend.config import EngineConfig
    from pagedserve.backend.engine.request import RequestBuilder

WIRE_VERSION = 2


# -- what the messages carry ---------------------------------------------------------------
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
    # AddRequest messages the core has taken so far: the client's adds beyond this count are
    # still on their way and wait too (its queue limit counts them).
    num_adds_received: int = 0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


# -- commands ------------------------------------------------------------------------------
@dataclass
class StartEngine:
    config: EngineConfig


@dataclass
class AddRequest:
    request: Request


@dataclass
class AbortRequest:
    request_id: str


@dataclass
class Shutdown:
    pass


Command = StartEngine | AddRequest | AbortRequest | Shutdown


# -- events --------------------------------------------------------------------------------
@dataclass
class EngineReady:
    model_info: ModelInfo
    builder: RequestBuilder
    load: LoadInfo


@dataclass
class EngineLoadFailed:
    error: BaseException


@dataclass
class StepOutputs:
    deltas: list[RequestOutputDelta]
    step: StepInfo | None
    load: LoadInfo


@dataclass
class EngineFailed:
    reason: str


@dataclass
class EngineExited:
    pass


Event = EngineReady | EngineLoadFailed | StepOutputs | EngineFailed | EngineExited
Message = Command | Event


# -- encoding ------------------------------------------------------------------------------
@dataclass
class _StepOutputsWire:
    """A StepOutputs with its plain deltas in columns; ``order`` says where each whole delta
    goes back (its index among all the step's deltas)."""

    request_ids: list[str]
    texts: list[str]
    token_ids: list[list[int]]
    whole: list[RequestOutputDelta]
    order: list[int]
    step: StepInfo | None
    load: LoadInfo
    num_deltas: int


def _is_plain(delta: RequestOutputDelta) -> bool:
    return delta.logprobs is None and not delta.finished and delta.error is None


def _flatten(message: StepOutputs) -> _StepOutputsWire:
    plain = [d for d in message.deltas if _is_plain(d)]
    order = [i for i, d in enumerate(message.deltas) if not _is_plain(d)]
    return _StepOutputsWire(
        request_ids=[d.request_id for d in plain],
        texts=[d.text for d in plain],
        token_ids=[d.token_ids for d in plain],
        whole=[message.deltas[i] for i in order],
        order=order,
        step=message.step,
        load=message.load,
        num_deltas=len(message.deltas),
    )


def _unflatten(wire: _StepOutputsWire) -> StepOutputs:
    plain = iter(
        [RequestOutputDelta(*fields) for fields in zip(wire.request_ids, wire.texts, wire.token_ids)]
    )
    whole = dict(zip(wire.order, wire.whole))
    deltas = [whole[i] if i in whole else next(plain) for i in range(wire.num_deltas)]
    return StepOutputs(deltas, wire.step, wire.load)


def encode(message: Message) -> bytes:
    body: object = _flatten(message) if isinstance(message, StepOutputs) else message
    return pickle.dumps((WIRE_VERSION, body), protocol=pickle.HIGHEST_PROTOCOL)


def decode(frame: bytes) -> Message:
    version, body = pickle.loads(frame)
    if version != WIRE_VERSION:
        raise ValueError(f"message of wire version {version}, expected {WIRE_VERSION}")
    if isinstance(body, _StepOutputsWire):
        return _unflatten(body)
    return body


def portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling, else a RuntimeError that names it."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error
