"""Batched sampling: penalties, temperature, top-k / top-p / min-p, seeds and logprobs.

All filters run on the whole [rows, vocab] logits at once; only per-request seeded noise is drawn
row by row (one vector per seeded request) so a seed gives the same tokens whatever else shares
the batch. Sampling uses the exponential race: argmax(p / E) with E ~ Exp(1) is a draw from p,
which needs no cumulative sum and no host round trip.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pagedserve.backend.engine.request import Request, TokenLogprob


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small host tensor to the device without waiting for the device's queued work
    (a plain copy from pageable memory synchronises the stream)."""
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


# Each array's start in the packed buffer, in int64 elements: 16 bytes. Triton specializes a
# kernel on whether each pointer argument is 16-byte aligned, so a slice whose alignment
# changed with the step's sizes would compile a second variant of every kernel it reaches,
# stalling every stream the first time.
_PACK_ALIGN = 2


def pack_arrays(arrays: list[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """The arrays as one flat int64 buffer, each starting 16-byte aligned; returns the buffer
    and each array's start (in elements)."""
    starts, total = [], 0
    for a in arrays:
        starts.append(total)
        total += -(-a.size // _PACK_ALIGN) * _PACK_ALIGN
    packed = np.zeros(total, dtype=np.int64)
    for a, start in zip(arrays, starts):
        packed[start : start + a.size] = a.reshape(-1)
    return packed, starts


def arrays_to_device(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Several small integer arrays on the device through one pinned buffer and one copy (each
    transfer costs the host tens of microseconds, a step has about ten of them); each comes
    back with its own shape and dtype. On the CPU they are the arrays themselves, uncopied."""
    if device.type != "cuda":
        return [torch.from_numpy(a) for a in arrays]
    packed, starts = pack_arrays(arrays)
    flat = to_device(torch.from_numpy(packed), device)
    out = []
    for a, start in zip(arrays, starts):
        part = flat[start : start + a.size].view(a.shape)
        out.append(part if a.dtype == np.int64 else part.to(_torch_dtype(a.dtype)))
    return out


@functools.cache
def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


@dataclass
class SamplingBatch:
    """Per-row sampling parameters of one step, as device tensors (built by ``from_requests``)."""

    temperature: torch.Tensor | None  # [N] fp32, 0 = greedy; None when every row is greedy
    top_k: torch.Tensor | None  # [N] int64, vocab size where off
    top_p: torch.Tensor | None  # [N] fp32
    min_p: torch.Tensor | None  # [N] fp32
    repetition_penalty: torch.Tensor | None  # [N, 1] fp32
    presence_penalty: torch.Tensor | None  # [N, 1]
    frequency_penalty: torch.Tensor | None  # [N, 1]
    seen_tokens: torch.Tensor | None  # [N, V] bool, prompt + output (repetition penalty)
    output_counts: torch.Tensor | None  # [N, V] fp32 (presence / frequency)
    banned: list[tuple[int, list[int]]]  # (row, token ids) masked until min_tokens is reached
    generators: list[torch.Generator | None]
    all_greedy: bool
    max_logprobs: int  # -1 when no row wants logprobs
    logprobs_n: list[int | None]

    @classmethod
    def from_requests(
        cls, requests: list[Request], vocab_size: int, device: torch.device,
        generators: list[torch.Generator | None],
    ) -> "SamplingBatch":
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

        rep = pres = freq = seen = counts = None
        if any(p.repetition_penalty != 1.0 for p in params):
            rep = column([p.repetition_penalty for p in params]).unsqueeze(1)
            seen = torch.zeros(n, vocab_size, dtype=torch.bool, device=device)
            for i, r in enumerate(requests):
                ids = torch.tensor(r.all_token_ids, dtype=torch.int64, device=device)
                seen[i, ids] = True
        if any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params):
            pres = column([p.presence_penalty for p in params]).unsqueeze(1)
            freq = column([p.frequency_penalty for p in params]).unsqueeze(1)
            counts = torch.zeros(n, vocab_size, dtype=torch.float32, device=device)
            for i, r in enumerate(requests):
                if r.output_token_ids:
                    ids = torch.tensor(r.output_token_ids, dtype=torch.int64, device=device)
                    counts[i].index_add_(0, ids, torch.ones_like(ids, dtype=torch.float32))

        banned = []
        for i, r in enumerate(requests):
            if len(r.output_token_ids) < r.params.min_tokens:
                ids = list(r.params.stop_token_ids)
                if not r.params.ignore_eos:
                    ids += list(r.eos_token_ids)
                if ids:
                    banned.append((i, ids))

        logprobs_n = [p.logprobs for p in params]
        wanted = [x for x in logprobs_n if x is not None]
        return cls(
            temperature=temperature,
            top_k=top_k, top_p=top_p, min_p=min_p,
            repetition_penalty=rep, presence_penalty=pres, frequency_penalty=freq,
            seen_tokens=seen, output_counts=counts, banned=banned, generators=generators,
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
        logits = self._apply_penalties(logits, batch)

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

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        for row, ids in batch.banned:
            logits[row, ids] = float("-inf")
        if batch.repetition_penalty is not None and batch.seen_tokens is not None:
            penalised = torch.where(
                logits > 0, logits / batch.repetition_penalty, logits * batch.repetition_penalty
            )
            logits = torch.where(batch.seen_tokens, penalised, logits)
        if batch.output_counts is not None:
            assert batch.presence_penalty is not None and batch.frequency_penalty is not None
            logits = logits - batch.frequency_penalty * batch.output_counts
            logits = logits - batch.presence_penalty * (batch.output_counts > 0).float()
        return logits

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
