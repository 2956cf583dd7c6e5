"""Batched sampling: penalties, temperature, top-k / top-p / min-p, seeds and logprobs.

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


@dataclass
class RepetitionPenalty:
    """Divides positive logits (multiplies negative ones) of every token seen in prompt or
    output."""

    penalty: torch.Tensor  # [N, 1] fp32
    seen: torch.Tensor  # [N, V] bool

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        penalised = torch.where(logits > 0, logits / self.penalty, logits * self.penalty)
        return torch.where(self.seen, penalised, logits)


@dataclass
class OccurrencePenalties:
    """Presence and frequency penalties over the tokens generated so far."""

    presence: torch.Tensor  # [N, 1]
    frequency: torch.Tensor  # [N, 1]
    counts: torch.Tensor  # [N, V] fp32

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits - self.frequency * self.counts
        return logits - self.presence * (self.counts > 0).float()


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

    @classmethod
    def from_requests(
        cls,
        requests: list[Request],
        vocab_size: int,
        device: torch.device,
        rng: random.Random | None = None,
    ) -> SamplingBatch:
        """``rng`` draws the keys of unseeded rows (a fresh key per row and step)."""
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

        def column(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return to_device(torch.tensor(values, dtype=dtype), device)

        processors: list[LogitsProcessor] = []
        banned = []
        for i, r in enumerate(requests):
            if len(r.output_token_ids) < r.params.min_tokens:
                ids = list(r.params.stop_token_ids)
                if not r.params.ignore_eos:
                    ids += list(r.eos_token_ids)
                if ids:
                    banned.append((i, ids))
        if banned:
            processors.append(BannedTokens(banned))
        if any(p.repetition_penalty != 1.0 for p in params):
            seen = torch.zeros(n, vocab_size, dtype=torch.bool, device=device)
            for i, r in enumerate(requests):
                seen[i, torch.tensor(r.all_token_ids, dtype=torch.int64, device=device)] = True
            penalty = column([p.repetition_penalty for p in params]).unsqueeze(1)
            processors.append(RepetitionPenalty(penalty, seen))
        if any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params):
            counts = torch.zeros(n, vocab_size, dtype=torch.float32, device=device)
            for i, r in enumerate(requests):
                if r.output_token_ids:
                    out = torch.tensor(r.output_token_ids, dtype=torch.int64, device=device)
                    counts[i].index_add_(0, out, torch.ones_like(out, dtype=torch.float32))
            processors.append(
                OccurrencePenalties(
                    presence=column([p.presence_penalty for p in params]).unsqueeze(1),
                    frequency=column([p.frequency_penalty for p in params]).unsqueeze(1),
                    counts=counts,
                )
            )

        logprobs_n = [p.logprobs for p in params]
        wanted = [x for x in logprobs_n if x is not None]
        return cls(
            temperature=temperature,
            top_k=top_k, top_p=top_p, min_p=min_p, keys=keys, positions=positions,
            processors=processors, generators=[r.generator for r in requests],
            all_greedy=all_greedy, max_logprobs=max(wanted) if wanted else -1,
            logprobs_n=logprobs_n,
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

    def batch(self, requests: list[Request], vocab_size: int, device: torch.device) -> SamplingBatch:
        return SamplingBatch.from_requests(requests, vocab_size, device, self.rng)

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> DeviceSample:
        """Sample every row on the logits' device, without any host synchronisation."""
        logits = logits.float()
        wanted = [i for i, n in enumerate(batch.logprobs_n) if n is not None]
        raw_logprobs = None
        if wanted:
            rows = logits
            if len(wanted) < logits.shape[0]:
                rows = logits[to_device(torch.tensor(wanted), logits.device)]
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

        chosen = top_vals = top_ids = None
        if raw_logprobs is not None:
            picked = sampled if len(wanted) == len(batch.logprobs_n) else sampled[
                to_device(torch.tensor(wanted), sampled.device)]
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
