"""Batched sampling: penalties, temperature, top-k / top-p / min-p, seeds and logprobs.

Penalties read each request's earlier tokens from the device (``token_history``), never from
the host, and every step appends the ids it samples there: so a request with penalties can be
scheduled while its previous token is still being sampled, like any other.

On CUDA one Triton kernel (``kernels.sampling``) filters and draws every row without sorting the
vocabulary; its noise is counter-based (Philox keyed by the request's seed, counting by token
and output position), so a seed gives the same tokens whatever else shares the batch. The torch
path (CPU) keeps the same kept-set definition with a sort, and draws seeded rows from their own
``torch.Generator``. Both draw by the exponential race, argmax(p / E) with E ~ Exp(1), which
needs no cumulative sum and no host round trip. Log-probabilities are computed only for the rows
that ask for them.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from pagedserve.backend.engine.request import Request, TokenLogprob
from pagedserve.backend.runner.batch import to_device
from pagedserve.backend.runner.token_history import HistoryRows, TokenHistory
from pagedserve.kernels.sampling import kept_threshold, sample_rows
from pagedserve.kernels.triton_utils import HAS_TRITON

_MASK64 = (1 << 64) - 1


def uses_kernel(device: torch.device) -> bool:
    """Whether rows on ``device`` are drawn by the Triton kernel (counter-based noise, no
    per-request generator) rather than the torch path."""
    return HAS_TRITON and device.type == "cuda"


@functools.lru_cache(maxsize=8192)
def seed_key(seed: int) -> int:
    """A request seed spread over 63 bits (splitmix64's finaliser), the Philox key of its rows:
    nearby seeds get unrelated keys."""
    z = (seed + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


class LogitsProcessor(Protocol):
    """A per-step change to the logits before sampling, built from the step's requests:
    penalties, min_tokens' banned ids, and (to come) grammar bitmasks. ``apply`` runs on the
    device without host synchronisation and may modify ``logits`` in place; it returns the
    logits to use."""

    def apply(self, logits: torch.Tensor) -> torch.Tensor: ...


@dataclass
class BannedTokens:
    """Ids masked out of some rows (min_tokens: EOS and stop ids until enough tokens)."""

    rows: list[tuple[int, list[int]]]  # (row, token ids)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for row, ids in self.rows:
            logits[row, ids] = float("-inf")
        return logits


def _on_rows(
    logits: torch.Tensor, rows: torch.Tensor | None, change: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``change`` applied to some rows of ``logits`` (None: all of them), the others untouched."""
    if rows is None:
        return change(logits)
    logits.index_copy_(0, rows, change(logits.index_select(0, rows)))
    return logits


@dataclass
class RepetitionPenalty:
    """Divides positive logits (multiplies negative ones) of every token seen in prompt or
    output."""

    rows: torch.Tensor | None  # [P] int64, the batch rows penalised; None: all of them
    penalty: torch.Tensor  # [P, 1] fp32
    seen: torch.Tensor  # [P, V] bool

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        def change(x: torch.Tensor) -> torch.Tensor:
            penalised = torch.where(x > 0, x / self.penalty, x * self.penalty)
            return torch.where(self.seen, penalised, x)

        return _on_rows(logits, self.rows, change)


@dataclass
class OccurrencePenalties:
    """Presence and frequency penalties over the tokens generated so far."""

    rows: torch.Tensor | None  # [P] int64, the batch rows penalised; None: all of them
    presence: torch.Tensor  # [P, 1]
    frequency: torch.Tensor  # [P, 1]
    counts: torch.Tensor  # [P, V] fp32

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        def change(x: torch.Tensor) -> torch.Tensor:
            x = x - self.frequency * self.counts
            return x - self.presence * (self.counts > 0).float()

        return _on_rows(logits, self.rows, change)


@dataclass
class SamplingBatch:
    """Per-row sampling parameters of one step, as device tensors (built by ``from_requests``)."""

    temperature: torch.Tensor | None  # [N] fp32, 0 = greedy; None when every row is greedy
    top_k: torch.Tensor | None  # [N] int64, vocab size where off
    top_p: torch.Tensor | None  # [N] fp32
    min_p: torch.Tensor | None  # [N] fp32
    # The kernel's counters: each row's Philox key and the index of the output token it draws.
    keys: torch.Tensor | None  # [N] int64
    positions: torch.Tensor | None  # [N] int64
    # Applied in order before temperature and filtering.
    processors: list[LogitsProcessor]
    generators: list[torch.Generator | None]
    all_greedy: bool
    max_logprobs: int  # -1 when no row wants logprobs
    logprobs_n: list[int | None]
    # The penalised rows, whose sampled ids are appended to their token history.
    history_rows: HistoryRows | None = None

    @classmethod
    def from_requests(
        cls,
        requests: list[Request],
        vocab_size: int,
        device: torch.device,
        rng: random.Random | None = None,
        history: TokenHistory | None = None,
    ) -> SamplingBatch:
        """``rng`` draws the keys of unseeded rows (a fresh key per row and step). Penalties
        read ``history`` (the sampler's, which the steps keep up to date); without one, a
        history of this batch alone, from the requests' host token lists."""
        params = [r.params for r in requests]
        n = len(requests)
        all_greedy = all(p.temperature == 0.0 for p in params)
        temperature = top_k = top_p = min_p = keys = positions = None
        if not all_greedy:
            # Two copies to the device: the float parameters and the integer ones, packed.
            rng = rng or random.Random()
            floats = torch.tensor(
                [[p.temperature for p in params], [p.top_p for p in params],
                 [p.min_p for p in params]], dtype=torch.float32)
            ints = torch.tensor(
                [[p.top_k if p.top_k > 0 else vocab_size for p in params],
                 [seed_key(p.seed) if p.seed is not None else rng.getrandbits(63) for p in params],
                 [len(r.output_token_ids) + r.num_in_flight for r in requests]], dtype=torch.int64)
            floats, ints = to_device(floats, device), to_device(ints, device)
            temperature, keys, positions = floats[0], ints[1], ints[2]
            if any(p.top_k > 0 for p in params):
                top_k = ints[0]
            if any(p.top_p < 1.0 for p in params):
                top_p = floats[1]
            if any(p.min_p > 0.0 for p in params):
                min_p = floats[2]

        processors: list[LogitsProcessor] = []
        banned = []
        for i, r in enumerate(requests):
            # The host knows how many tokens it has sampled, in flight or not.
            if len(r.output_token_ids) + r.num_in_flight < r.params.min_tokens:
                ids = list(r.params.stop_token_ids)
                if not r.params.ignore_eos:
                    ids += list(r.eos_token_ids)
                if ids:
                    banned.append((i, ids))
        if banned:
            processors.append(BannedTokens(banned))

        history_rows = None
        penalised = [i for i, p in enumerate(params) if p.has_penalties]
        if penalised:
            if history is None:
                history = TokenHistory(vocab_size, device)
            history_rows = history.rows_for(
                [requests[i] for i in penalised], None if len(penalised) == n else penalised)
            weights = to_device(torch.tensor(
                [[params[i].repetition_penalty for i in penalised],
                 [params[i].presence_penalty for i in penalised],
                 [params[i].frequency_penalty for i in penalised]], dtype=torch.float32), device)
            weights = weights.unsqueeze(2)  # [3, P, 1]: one column per parameter
            rows = history_rows.batch_rows
            if any(params[i].repetition_penalty != 1.0 for i in penalised):
                processors.append(RepetitionPenalty(rows, weights[0], history_rows.seen()))
            if any(params[i].presence_penalty != 0.0 or params[i].frequency_penalty != 0.0
                   for i in penalised):
                processors.append(OccurrencePenalties(
                    rows, presence=weights[1], frequency=weights[2], counts=history_rows.counts()))
        processors.extend(LogitBias.for_requests(requests, device))

        logprobs_n = [p.logprobs for p in params]
        wanted = [x for x in logprobs_n if x is not None]
        return cls(
            temperature=temperature,
            top_k=top_k, top_p=top_p, min_p=min_p, keys=keys, positions=positions,
            processors=processors, generators=[r.generator for r in requests],
            all_greedy=all_greedy, max_logprobs=max(wanted) if wanted else -1,
            logprobs_n=logprobs_n, history_rows=history_rows,
        )


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


@dataclass
class DeviceSample:
    """A step's sampled ids (and logprobs) still on the device.

    ``start_copy`` queues their transfer to host memory right behind the sampling kernels and
    returns at once, so the engine can queue the next step before it waits; ``to_host`` then
    waits for that transfer alone, not for whatever was queued after it.
    """

    token_ids: torch.Tensor  # [N] int64
    chosen_logprobs: torch.Tensor | None  # [N] fp32
    top_logprobs: torch.Tensor | None  # [N, k]
    top_ids: torch.Tensor | None  # [N, k]
    logprobs_n: list[int | None]
    # The rows the logprob tensors hold, in order (those whose logprobs_n is set).
    logprob_rows: list[int] = field(default_factory=list)
    _host: list[torch.Tensor | None] | None = None
    _copied: torch.cuda.Event | None = None

    def _tensors(self) -> list[torch.Tensor | None]:
        return [self.token_ids, self.chosen_logprobs, self.top_logprobs, self.top_ids]

    def start_copy(self) -> None:
        if self.token_ids.device.type != "cuda":
            return
        self._host = [
            None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
            for t in self._tensors()
        ]
        self._copied = torch.cuda.Event()
        self._copied.record()

    def to_host(self, wait_for: Callable[[torch.cuda.Event], None] | None = None) -> SamplerOutput:
        """The sampled ids (and logprobs) as Python lists; ``wait_for(event)`` replaces the
        blocking wait for the copy."""
        if self._copied is not None and self._host is not None:
            if wait_for is None:
                self._copied.synchronize()
            else:
                wait_for(self._copied)
            host = self._host
        else:
            host = self._tensors()
        ids_t, chosen_t, top_vals_t, top_ids_t = host
        assert ids_t is not None
        token_ids = ids_t.tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(token_ids)
        if chosen_t is not None:
            chosen = chosen_t.tolist()
            top_vals = top_vals_t.tolist() if top_vals_t is not None else None
            top_ids = top_ids_t.tolist() if top_ids_t is not None else None
            for j, i in enumerate(self.logprob_rows):
                n = self.logprobs_n[i]
                assert n is not None
                top = (
                    list(zip(top_ids[j][:n], top_vals[j][:n]))
                    if top_ids is not None and top_vals is not None
                    else []
                )
                logprobs[i] = TokenLogprob(token_ids[i], chosen[j], top)
        return SamplerOutput(token_ids, logprobs)


class Sampler:
    def __init__(self, default_generator: torch.Generator) -> None:
        self.default_generator = default_generator
        # Keys of unseeded rows, reproducible from the engine's seed.
        self.rng = random.Random(default_generator.initial_seed())
        # Made when the first request with penalties is sampled: until then requests without
        # any never reach it.
        self.history: TokenHistory | None = None

    def batch(self, requests: list[Request], vocab_size: int, device: torch.device) -> SamplingBatch:
        if self.history is None and any(r.params.has_penalties for r in requests):
            self.history = TokenHistory(vocab_size, device)
        return SamplingBatch.from_requests(requests, vocab_size, device, self.rng, self.history)

    def release(self, request: Request) -> None:
        """Forget a finished request: its token-history row goes back."""
        if self.history is not None:
            self.history.free(request)

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> DeviceSample:
        """Sample every row on the logits' device, without any host synchronisation; the
        penalised rows' ids are appended to their token history, queued right behind."""
        logits = logits.float()
        wanted = [i for i, n in enumerate(batch.logprobs_n) if n is not None]
        # The rows that ask for logprobs, as a device index (None: every row or none asks).
        wanted_index = None
        if wanted and len(wanted) < logits.shape[0]:
            wanted_index = to_device(torch.tensor(wanted), logits.device)
        raw_logprobs = None
        if wanted:
            rows = logits if wanted_index is None else logits[wanted_index]
            raw_logprobs = torch.log_softmax(rows, dim=-1)
        for processor in batch.processors:
            logits = processor.apply(logits)

        if batch.all_greedy:
            sampled = logits.argmax(dim=-1)
        elif uses_kernel(logits.device):
            assert batch.temperature is not None and batch.keys is not None
            assert batch.positions is not None
            sampled, _ = sample_rows(
                logits.contiguous(), batch.temperature, batch.keys, batch.positions,
                batch.top_k, batch.top_p, batch.min_p)
        else:
            sampled = self._sample(logits, batch)
        if batch.history_rows is not None:
            batch.history_rows.append(sampled)

        chosen = top_vals = top_ids = None
        if raw_logprobs is not None:
            picked = sampled if wanted_index is None else sampled[wanted_index]
            chosen = raw_logprobs.gather(1, picked.unsqueeze(1)).squeeze(1)
            k = max(batch.max_logprobs, 0)
            if k:
                top_vals, top_ids = raw_logprobs.topk(k, dim=-1)
        return DeviceSample(sampled, chosen, top_vals, top_ids, batch.logprobs_n, wanted)

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        """The torch path: the kept set from ``kept_threshold`` (a sort), seeded rows drawn from
        their own generators."""
        assert batch.temperature is not None  # built whenever a row is not greedy
        greedy_rows = batch.temperature == 0.0
        greedy_tokens = logits.argmax(dim=-1)
        if batch.top_k is not None or batch.top_p is not None or batch.min_p is not None:
            smallest = kept_threshold(
                logits, batch.temperature, batch.top_k, batch.top_p, batch.min_p)
            logits = logits.masked_fill(logits < smallest.unsqueeze(1), float("-inf"))
        temperature = torch.where(greedy_rows, torch.ones_like(batch.temperature), batch.temperature)
        probs = torch.softmax(logits / temperature.unsqueeze(1), dim=-1)

        noise = torch.empty_like(probs)
        unseeded = [i for i, g in enumerate(batch.generators) if g is None]
        if unseeded:
            rows = torch.empty(len(unseeded), probs.shape[1], device=probs.device)
            rows.exponential_(generator=self.default_generator)
            noise[unseeded] = rows
        for i, g in enumerate(batch.generators):
            if g is not None:
                noise[i].exponential_(generator=g)
        random_tokens = (probs / noise).argmax(dim=-1)
        return torch.where(greedy_rows, greedy_tokens, random_tokens)


@dataclass
class LogitBias:
    """``SamplingParams.logit_bias``: fixed additions to some tokens' logits of some rows,
    applied with the other processors (the reported logprobs stay the model's own)."""

    rows: torch.Tensor  # [M] int64, the row of each biased (row, token) pair
    token_ids: torch.Tensor  # [M] int64
    biases: torch.Tensor  # [M] fp32

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.index_put_((self.rows, self.token_ids), self.biases, accumulate=True)

    @classmethod
    def for_requests(cls, requests: list[Request], device: torch.device) -> list[LogitBias]:
        """One processor for the step's biased rows, or none when no request has a bias."""
        rows: list[int] = []
        token_ids: list[int] = []
        biases: list[float] = []
        for row, request in enumerate(requests):
            bias = request.params.logit_bias
            if bias:
                rows.extend([row] * len(bias))
                token_ids.extend(bias)
                biases.extend(bias.values())
        if not rows:
            return []
        return [
            cls(
                to_device(torch.tensor(rows, dtype=torch.int64), device),
                to_device(torch.tensor(token_ids, dtype=torch.int64), device),
                to_device(torch.tensor(biases, dtype=torch.float32), device),
            )
        ]
