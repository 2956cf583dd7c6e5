"""Executes one scheduled step: flat varlen batch in, sampled token ids out.

The runner owns the model, the KV cache tensors and the sampler. It never decides who runs: it
reads the scheduler's output (which requests, how many new tokens each, their block tables) and
returns one token per request whose step reached the end of its known tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagedserve.backend.config import EngineConfig
from pagedserve.backend.engine.request import Request, TokenLogprob
from pagedserve.backend.engine.scheduler import SchedulerOutput
from pagedserve.backend.models.loader import LoadedModel, load_model, resolve_dtype
from pagedserve.backend.runner.attention import AttentionMetadata, get_attention_backend
from pagedserve.backend.runner.cuda_graph import DecodeGraphs
from pagedserve.backend.runner.sampler import Sampler, SamplingBatch

GIB = 1 << 30


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class StepResult:
    """Sampled tokens of one step, aligned with ``requests`` (those whose step samples)."""

    requests: list[Request]
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.model.device)
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        self.block_size = config.cache.block_size
        torch.manual_seed(config.model.seed)
        self.attn_backend = get_attention_backend(self.device)
        self.loaded: LoadedModel = load_model(config.model, self.device, self.dtype, self.attn_backend)
        self.model = self.loaded.model
        self.max_model_len = self.loaded.max_model_len
        generator = torch.Generator(device=self.device)
        generator.manual_seed(config.model.seed)
        self.sampler = Sampler(generator)
        self.generators: dict[str, torch.Generator] = {}
        self.num_blocks = self._num_kv_blocks()
        self.kv_caches = self._allocate_kv_caches(self.num_blocks)
        self.decode_graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and config.enable_cuda_graphs:
            self.decode_graphs = self._capture_decode_graphs()

    # -- sizing ----------------------------------------------------------------------------
    def kv_block_bytes(self) -> int:
        m = self.model
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * m.num_layers * self.block_size * m.num_kv_heads * m.head_dim * elem

    def _allocate_kv_caches(self, num_blocks: int) -> list[torch.Tensor]:
        m = self.model
        shape = (2, num_blocks, self.block_size, m.num_kv_heads, m.head_dim)
        return [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(m.num_layers)]

    def _num_kv_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_blocks is not None:
            return cache.num_blocks
        if self.device.type != "cuda":
            return max(1, int(cache.cpu_kv_cache_gib * GIB // self.kv_block_bytes()))
        # What a full-budget step needs beyond the weights: measured, not guessed.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self._profile_step()
        activation_peak = torch.cuda.max_memory_allocated(self.device) - before
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        budget = free - (1 - cache.gpu_memory_utilization) * total - activation_peak
        return max(1, int(budget // self.kv_block_bytes()))

    @torch.inference_mode()
    def _profile_step(self) -> None:
        """One forward of max_num_batched_tokens prompt tokens plus sampling max_num_seqs rows,
        on a throwaway cache, to measure peak activation memory."""
        sched = self.config.scheduler
        n = sched.max_num_batched_tokens
        bs = self.block_size
        blocks = -(-n // bs)
        caches = self._allocate_kv_caches(blocks)
        dev = self.device
        metadata = AttentionMetadata(
            slot_mapping=torch.arange(n, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([n], dtype=torch.int32, device=dev),
            block_tables=torch.arange(blocks, dtype=torch.int32, device=dev).unsqueeze(0),
            max_query_len=n, max_seq_len=n, query_lens_cpu=[n], seq_lens_cpu=[n],
        )
        ids = torch.zeros(n, dtype=torch.int64, device=dev)
        hidden = self.model(ids, torch.arange(n, device=dev), caches, metadata)
        rows = min(sched.max_num_seqs, n)
        logits = self.model.compute_logits(hidden[:rows])
        logits.sort(dim=-1, descending=True)  # top-k/top-p filtering's largest temporary
        torch.cuda.synchronize(dev)
        del caches, hidden, logits

    def _capture_decode_graphs(self) -> DecodeGraphs:
        from pagedserve.kernels.paged_attention import choose_num_kv_splits

        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        kv_heads = self.model.num_kv_heads
        graphs = DecodeGraphs(
            self.model, self.kv_caches, self.config.scheduler.max_num_seqs, self.max_model_len,
            self.block_size,
            kv_splits_for=lambda size: choose_num_kv_splits(size, kv_heads, self.max_model_len, sms),
        )
        graphs.capture()
        return graphs

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(array)
        if self.device.type == "cuda":
            return host.pin_memory().to(self.device, non_blocking=True)
        return host

    # -- per-request state -----------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.params.seed is not None:
            g = torch.Generator(device=self.device)
            g.manual_seed(request.params.seed)
            self.generators[request.request_id] = g

    def remove_request(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    # -- execution -------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> StepResult:
        bs = self.block_size
        ids: list[np.ndarray] = []
        pos: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        samplers: list[Request] = []
        max_blocks = max(len(s.request.block_ids) for s in sched.scheduled)
        tables = np.zeros((len(sched.scheduled), max_blocks), dtype=np.int32)
        row_end = 0
        for i, s in enumerate(sched.scheduled):
            req = s.request
            start = req.num_computed_tokens
            end = start + s.num_new_tokens
            if s.num_new_tokens == 1:
                ids.append(np.array([req.token_at(start)], dtype=np.int64))
            else:
                ids.append(np.array(req.all_token_ids[start:end], dtype=np.int64))
            p = np.arange(start, end, dtype=np.int64)
            table = np.asarray(req.block_ids, dtype=np.int64)
            tables[i, : len(table)] = table
            pos.append(p)
            slots.append(table[p // bs] * bs + p % bs)
            query_lens.append(s.num_new_tokens)
            seq_lens.append(end)
            row_end += s.num_new_tokens
            if s.samples:
                sample_rows.append(row_end - 1)
                samplers.append(req)

        dev = self.device
        query_start = np.zeros(len(query_lens) + 1, dtype=np.int32)
        np.cumsum(query_lens, out=query_start[1:])
        metadata = AttentionMetadata(
            slot_mapping=self._to_device(np.concatenate(slots)),
            query_start_loc=self._to_device(query_start),
            seq_lens=self._to_device(np.asarray(seq_lens, dtype=np.int32)),
            block_tables=self._to_device(tables),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
        )
        input_ids = self._to_device(np.concatenate(ids))
        positions = self._to_device(np.concatenate(pos))
        if self.decode_graphs is not None and self.decode_graphs.fits(metadata):
            hidden = self.decode_graphs.run(input_ids, positions, metadata)
        else:
            hidden = self.model(input_ids, positions, self.kv_caches, metadata)
        if not samplers:
            return StepResult([], [], [])
        logits = self.model.compute_logits(hidden[self._to_device(np.asarray(sample_rows))])
        batch = SamplingBatch.from_requests(
            samplers,
            logits.shape[-1],
            dev,
            [self.generators.get(r.request_id) for r in samplers],
        )
        out = self.sampler(logits, batch)
        return StepResult(samplers, out.token_ids, out.logprobs)
