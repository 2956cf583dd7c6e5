"""Batched sampling: penalties, temperature, top-k / top-p / min-p, seeds and logprobs.

All filters run on the whole [rows, vocab] logits at once; only per-request seeded noise is drawn
row by row (one vector per seeded request) so a seed gives the same tokens whatever else shares
the batch. Sampling uses the exponential race: argmax(p / E) with E ~ Exp(1) is a draw from p,
which needs no cumulative sum and no host round trip.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from pagedserve.backend.engine.request import Request, TokenLogprob
from pagedserve.backend.runner.batch import to_device


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
    # Applied in order before temperature and filtering.
    processors: list[LogitsProcessor]
    generators: list[torch.Generator | None]
    all_greedy: bool
    max_logprobs: int  # -1 when no row wants logprobs
    logprobs_n: list[int | None]

    @classmethod
    def from_requests(
        cls, requests: list[Request], vocab_size: int, device: torch.device
    ) -> SamplingBatch:
        params = [r.params for r in requests]
        n = len(requests)

        def column(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return to_device(torch.tensor(values, dtype=dtype), device)

        all_greedy = all(p.temperature == 0.0 for p in params)
        temperature = top_k = top_p = min_p = None
        if not all_greedy:
            temperature = column([p.temperature for p in params])
            if any(p.top_k > 0 for p in params):
                top_k = column([p.top_k if p.top_k > 0 else vocab_size for p in params], torch.int64)
            if any(p.top_p < 1.0 for p in params):
                top_p = column([p.top_p for p in params])
            if any(p.min_p > 0.0 for p in params):
                min_p = column([p.min_p for p in params])

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
        processors.extend(LogitBias.for_requests(requests, device))

        logprobs_n = [p.logprobs for p in params]
        wanted = [x for x in logprobs_n if x is not None]
        return cls(
            temperature=temperature,
            top_k=top_k, top_p=top_p, min_p=min_p,
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
            for i, n in enumerate(self.logprobs_n):
                if n is None:
                    continue
                top = (
                    list(zip(top_ids[i][:n], top_vals[i][:n]))
                    if top_ids is not None and top_vals is not None
                    else []
                )
                logprobs[i] = TokenLogprob(token_ids[i], chosen[i], top)
        return SamplerOutput(token_ids, logprobs)


class Sampler:
    def __init__(self, default_generator: torch.Generator) -> None:
        self.default_generator = default_generator

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> DeviceSample:
        """Sample every row on the logits' device, without any host synchronisation."""
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1) if batch.max_logprobs >= 0 else None
        for processor in batch.processors:
            logits = processor.apply(logits)

        if batch.all_greedy:
            sampled = logits.argmax(dim=-1)
        else:
            sampled = self._sample(logits, batch)

        chosen = top_vals = top_ids = None
        if raw_logprobs is not None:
            chosen = raw_logprobs.gather(1, sampled.unsqueeze(1)).squeeze(1)
            k = max(batch.max_logprobs, 0)
            if k:
                top_vals, top_ids = raw_logprobs.topk(k, dim=-1)
        return DeviceSample(sampled, chosen, top_vals, top_ids, batch.logprobs_n)

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        assert batch.temperature is not None  # built whenever a row is not greedy
        greedy_rows = batch.temperature == 0.0
        greedy_tokens = logits.argmax(dim=-1)
        temperature = torch.where(greedy_rows, torch.ones_like(batch.temperature), batch.temperature)
        logits = logits / temperature.unsqueeze(1)
        logits = self._filter(logits, batch)
        probs = torch.softmax(logits, dim=-1)

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

    @staticmethod
    def _filter(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        if batch.top_k is None and batch.top_p is None and batch.min_p is None:
            return logits
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
        if batch.top_k is not None:
            ranks = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)
            remove |= ranks >= batch.top_k.unsqueeze(1)
        if batch.top_p is not None or batch.min_p is not None:
            probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
            if batch.top_p is not None:
                # Drop a token when the tokens before it already reach top_p (keeps the first).
                before = probs.cumsum(dim=-1) - probs
                remove |= before >= batch.top_p.unsqueeze(1)
            if batch.min_p is not None:
                remove |= probs < batch.min_p.unsqueeze(1) * probs[:, :1]
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        return torch.empty_like(logits).scatter_(1, order, sorted_logits)


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
