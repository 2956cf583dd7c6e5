"""The GPU performance workloads, each beside its practical floor measured in the same run.

    python tests/gpu/perf_bench.py --tokenizer DIR --models 1b,8b --out OUT [--smoke]

Workloads (random-weight bf16 Llama-3.2-1B / Llama-3-8B from the public configs, the public
``LLM`` API, ignore_eos):
- ``greedy``: 256 requests x 512 random prompt tokens / 256 output tokens, temperature 0;
- ``sampled``: the same with temperature 0.8, top-p 0.95, top-k 50 and a seed per request;
- ``batch1``: one such request alone (ms per output token);
- ``long``: 24 prompts of 8,000 tokens, one output token each (prompt tokens per second);
- ``mixed``: 512 requests, prompt lengths log-normal around 250 tokens clipped to 8..2,048,
  outputs log-normal around 180 clipped to 8..1,024 (seeded).

The floor of a workload is the time its work takes with nothing but the unavoidable parts:
- every forward's dense layers (q/k/v, o, gate/up, down of every layer, and the lm head for the
  rows that sample) as cuBLAS matmuls replayed from a CUDA graph, timed here at each batch size
  a decode step uses and at the prefill chunk size;
- every decode step's K/V read once at the copy bandwidth measured here;
- prefill attention as causal FLOPs (QK^T and PV over half the square) at the bf16 matmul rate
  measured here.
Decode steps are those of an ideal continuous batcher with the engine's sequence limit: a
request joins as soon as a slot is free and leaves after its last token; its prefill is counted
in the prefill part. Rates in between measured batch sizes are interpolated linearly.
Prints one table and writes ``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CONFIGS = Path(__file__).resolve().parent / "configs"
MODELS = {"1b": "llama-3.2-1b", "8b": "llama-3-8b"}
ENGINE: dict[str, Any] = dict(
    load_format="dummy", dtype="bfloat16", max_model_len=8192, max_num_seqs=256,
    max_num_batched_tokens=16384,
)
STANDARD = (256, 512, 256)  # requests, prompt tokens, output tokens
LONG = (24, 8000)
MIXED_REQUESTS = 512
ROUNDS = 2
BATCH_GRID = (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256)
SMOKE_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 4096,
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
}
GIB = 1 << 30


def use_smoke_settings() -> None:
    global STANDARD, LONG, MIXED_REQUESTS, BATCH_GRID, ROUNDS
    STANDARD, LONG, MIXED_REQUESTS, BATCH_GRID, ROUNDS = (4, 24, 6), (2, 64), 6, (1, 2, 4), 1
    ENGINE.update(dtype="float32", device="cpu", max_num_seqs=8, max_num_batched_tokens=128,
                  max_model_len=512)


def model_dir(name: str, tokenizer: Path, work: Path) -> Path:
    target = work / name
    target.mkdir(parents=True, exist_ok=True)
    if ENGINE.get("device") == "cpu":
        (target / "config.json").write_text(json.dumps(SMOKE_CONFIG))
    else:
        shutil.copy(CONFIGS / MODELS[name] / "config.json", target / "config.json")
    for f in tokenizer.iterdir():
        if f.is_file() and f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, target / f.name)
    return target


# -- workloads ------------------------------------------------------------------------------------
@dataclass
class Workload:
    name: str
    prompt_lens: list[int]
    output_lens: list[int]
    sampled: bool = False
    # Sampled, plus repetition / presence / frequency penalties, and logprobs on every 4th.
    penalized: bool = False

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def workloads() -> list[Workload]:
    n, p, o = STANDARD
    rng = random.Random(3)

    def lognormal(median: float, lo: int, hi: int) -> int:
        return int(min(hi, max(lo, round(rng.lognormvariate(math.log(median), 0.8)))))

    mixed_p = [lognormal(250, 8, 2048) for _ in range(MIXED_REQUESTS)]
    mixed_o = [lognormal(180, 8, 1024) for _ in range(MIXED_REQUESTS)]
    if ENGINE.get("device") == "cpu":
        mixed_p = [min(x, 64) for x in mixed_p]
        mixed_o = [min(x, 16) for x in mixed_o]
    return [
        Workload("greedy", [p] * n, [o] * n),
        Workload("sampled", [p] * n, [o] * n, sampled=True),
        Workload("penalized", [p] * n, [o] * n, sampled=True, penalized=True),
        Workload("batch1", [p], [o]),
        Workload("long", [LONG[1]] * LONG[0], [1] * LONG[0]),
        Workload("mixed", mixed_p, mixed_o),
    ]


def run_workload(llm: Any, w: Workload, vocab: int, seed: int) -> float:
    from pagedserve import SamplingParams

    rng = random.Random(seed)
    prompts = [[rng.randrange(1000, vocab - 1000) for _ in range(n)] for n in w.prompt_lens]
    if w.sampled:
        extra = lambda i: dict(  # noqa: E731
            repetition_penalty=1.1, presence_penalty=0.2, frequency_penalty=0.2,
            logprobs=2 if i % 4 == 0 else None) if w.penalized else {}
        params = [SamplingParams(max_tokens=o, temperature=0.8, top_p=0.95, top_k=50,
                                 seed=seed * 1000 + i, ignore_eos=True, detokenize=False,
                                 **extra(i))
                  for i, o in enumerate(w.output_lens)]
    else:
        params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True,
                                 detokenize=False) for o in w.output_lens]
    sync()
    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    sync()
    seconds = time.perf_counter() - t0
    assert sum(len(o.token_ids) for o in outs) == w.output_tokens
    if w.penalized:  # logprobs exactly for the rows that asked
        assert all((o.logprobs is not None) == (i % 4 == 0) for i, o in enumerate(outs))
    return seconds


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# -- floors ---------------------------------------------------------------------------------------
@dataclass
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    vocab: int

    @classmethod
    def of(cls, config: dict[str, Any]) -> Shape:
        h, heads = config["hidden_size"], config["num_attention_heads"]
        return cls(config["num_hidden_layers"], h, heads, config["num_key_value_heads"],
                   config.get("head_dim") or h // heads, config["intermediate_size"],
                   config["vocab_size"])

    @property
    def kv_bytes_per_token(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * 2


class Floors:
    """The measured parts of every floor: dense layers at each batch size, copy bandwidth,
    matmul rate."""

    def __init__(self, shape: Shape, chunk: int) -> None:
        self.shape = shape
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.copy_bw, self.matmul_flops = self._ceilings()
        s, d = shape, dict(device=self.device, dtype=self.dtype)
        self.weights = [
            (torch.randn(s.hidden, (s.heads + 2 * s.kv_heads) * s.head_dim, **d) * 0.01,
             torch.randn(s.heads * s.head_dim, s.hidden, **d) * 0.01,
             torch.randn(s.hidden, 2 * s.inter, **d) * 0.01,
             torch.randn(s.inter, s.hidden, **d) * 0.01)
            for _ in range(s.layers)
        ]
        self.lm_head = torch.randn(s.hidden, s.vocab, **d) * 0.01
        self.decode = {b: self._dense_seconds(b, b) for b in BATCH_GRID}
        self.chunk = chunk
        self.chunk_s = self._dense_seconds(chunk, 1)
        del self.weights, self.lm_head
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _ceilings(self) -> tuple[float, float]:
        n = GIB // 2 if self.device.type == "cuda" else 1 << 22
        src = torch.randn(n, dtype=torch.float16, device=self.device)
        dst = torch.empty_like(src)
        copy_s = self._time(lambda: dst.copy_(src))
        m = 8192 if self.device.type == "cuda" else 256
        a = torch.randn(m, m, dtype=self.dtype, device=self.device)
        b = torch.randn(m, m, dtype=self.dtype, device=self.device)
        mm_s = self._time(lambda: a @ b)
        return 2 * src.numel() * src.element_size() / copy_s, 2 * m**3 / mm_s

    def _time(self, fn: Any, reps: int = 10) -> float:
        fn()
        sync()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    def _dense_seconds(self, tokens: int, sampled_rows: int) -> float:
        """One forward's matmuls for ``tokens`` rows, replayed from a CUDA graph on the device."""
        s = self.shape
        x = torch.randn(tokens, s.hidden, device=self.device, dtype=self.dtype)

        def forward() -> None:
            h = x
            for qkv, o, gate_up, down in self.weights:
                q = h @ qkv
                a = q[:, : s.heads * s.head_dim] @ o
                g = a @ gate_up
                h = g[:, : s.inter] @ down
            _ = h[:sampled_rows] @ self.lm_head

        if self.device.type != "cuda":
            return self._time(forward, reps=3)
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            forward()
        return self._time(graph.replay)

    def dense(self, batch: int) -> float:
        """Decode-step dense time at ``batch`` rows, interpolated between measured sizes."""
        grid = sorted(self.decode)
        if batch <= grid[0]:
            return self.decode[grid[0]]
        for lo, hi in zip(grid, grid[1:]):
            if batch <= hi:
                f = (batch - lo) / (hi - lo)
                return self.decode[lo] + f * (self.decode[hi] - self.decode[lo])
        return self.decode[grid[-1]] * batch / grid[-1]

    def prefill_seconds(self, prompt_lens: list[int]) -> float:
        s = self.shape
        dense = self.chunk_s * sum(prompt_lens) / self.chunk
        attention = sum(4 * s.layers * s.heads * s.head_dim * n * n / 2 for n in prompt_lens)
        return dense + attention / self.matmul_flops

    def decode_seconds(self, w: Workload, slots: int) -> float:
        """Decode steps of an ideal continuous batcher: each step every live request adds one
        token (its first came with its prefill) and reads its whole K/V once."""
        pending = list(zip(w.prompt_lens, w.output_lens))[::-1]
        live: list[list[int]] = []  # [context length, tokens still to decode]
        total = 0.0
        while pending or live:
            while pending and len(live) < slots:
                p, o = pending.pop()
                if o > 1:
                    live.append([p + 1, o - 1])
            if not live:
                continue
            kv = sum(ctx for ctx, _ in live) * self.shape.kv_bytes_per_token
            total += self.dense(len(live)) + kv / self.copy_bw
            for seq in live:
                seq[0] += 1
                seq[1] -= 1
            live = [seq for seq in live if seq[1] > 0]
        return total

    def seconds(self, w: Workload, slots: int) -> float:
        return self.prefill_seconds(w.prompt_lens) + self.decode_seconds(w, slots)


# -- the run --------------------------------------------------------------------------------------
def rate(w: Workload, seconds: float) -> tuple[float, str]:
    if w.name == "batch1":
        return seconds / w.output_tokens * 1e3, "ms/token"
    if w.name == "long":
        return sum(w.prompt_lens) / seconds, "prompt tok/s"
    return w.output_tokens / seconds, "output tok/s"


def bench_model(
    name: str, tokenizer: Path, work: Path, only: set[str], profile: str = "",
    grouped: tuple[int, ...] = (),
) -> list[dict[str, Any]]:
    from pagedserve import LLM

    model = model_dir(name, tokenizer, work)
    config = json.loads((model / "config.json").read_text())
    shape = Shape.of(config)
    floors = Floors(shape, ENGINE["max_num_batched_tokens"])
    print(f"{name}: copy {floors.copy_bw / 1e9:.0f} GB/s, matmul {floors.matmul_flops / 1e12:.0f} "
          f"TFLOP/s; dense decode step {1e3 * floors.dense(1):.3f} ms at 1, "
          f"{1e3 * floors.dense(256):.3f} ms at 256; chunk {floors.chunk}: "
          f"{1e3 * floors.chunk_s:.2f} ms", flush=True)
    vocab = config["vocab_size"]
    if torch.cuda.is_available():
        bench_sampler(vocab)
    llm = LLM(str(model), **ENGINE)
    warm = Workload("warm", [32] * 4, [4] * 4)
    run_workload(llm, warm, vocab, 99)
    run_workload(llm, Workload("warm", [32] * 4, [4] * 4, sampled=True), vocab, 98)
    rows = []
    for index, w in enumerate(workloads()):
        if only and w.name not in only:
            continue
        # Fresh prompts for every run of every workload: no prefix-cache hits between them.
        runs = [run_workload(llm, w, vocab, seed=100 * index + r) for r in range(ROUNDS)]
        best = min(runs)
        floor = floors.seconds(w, ENGINE["max_num_seqs"])
        value, unit = rate(w, best)
        floor_value, _ = rate(w, floor)
        row = {"model": name, "workload": w.name, "unit": unit, "value": value,
               "runs_s": runs, "floor_s": floor, "floor_value": floor_value,
               "fraction_of_floor": floor / best}
        rows.append(row)
        print(f"  {w.name:<8} {value:>10,.3f} {unit:<13} floor {floor_value:>10,.3f}  "
              f"{100 * floor / best:5.1f}% of floor  (runs {', '.join(f'{r:.2f}' for r in runs)} s)",
              flush=True)
    if grouped and (not only or "mixed" in only):
        # The mixed workload again, waiting requests admitted in groups (SchedulerConfig).
        w = next(w for w in workloads() if w.name == "mixed")
        scheduler_config = llm.engine.scheduler.config
        for group in grouped:
            scheduler_config.admission_group = group
            runs = [run_workload(llm, w, vocab, seed=900 + 10 * group + r) for r in range(ROUNDS)]
            floor = floors.seconds(w, ENGINE["max_num_seqs"])
            value, unit = rate(w, min(runs))
            rows.append({"model": name, "workload": f"mixed/group-{group}", "unit": unit,
                         "value": value, "runs_s": runs, "floor_s": floor,
                         "floor_value": rate(w, floor)[0], "fraction_of_floor": floor / min(runs)})
            print(f"  mixed, admission_group {group}: {value:,.0f} {unit}, "
                  f"{100 * floor / min(runs):.1f}% of floor (runs {runs})", flush=True)
        scheduler_config.admission_group = 1
    if profile and torch.cuda.is_available():
        try:
            profile_workload(llm, next(w for w in workloads() if w.name == profile), vocab)
        except Exception as e:  # the figures above stand without the profile
            print(f"profile failed: {e!r}")
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def step_kinds(llm: Any, w: Workload, vocab: int) -> None:
    """Host and device time per step kind (decode only, prefill only, mixed): the runner's
    ``execute`` (which queues a step and returns) timed on the host, and CUDA events around it
    on the stream, which time the step's own device work (the stream runs steps in order)."""
    runner = llm.engine.runner
    execute = runner.execute
    records: list[tuple[str, int, float, Any, Any]] = []

    def timed_execute(sched: Any) -> Any:
        prefill = any(s.request.num_computed_tokens < s.request.num_prompt_tokens
                      for s in sched.scheduled)
        decode = any(s.request.num_computed_tokens >= s.request.num_prompt_tokens
                     for s in sched.scheduled)
        kind = "mixed" if prefill and decode else ("prefill" if prefill else "decode")
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        launched = execute(sched)
        end.record()
        records.append((kind, len(sched.scheduled), time.perf_counter() - t0, start, end))
        return launched

    runner.execute = timed_execute
    try:
        seconds = run_workload(llm, w, vocab, seed=8888)
    finally:
        runner.execute = execute
    print(f"\nsteps of {w.name} ({seconds:.2f} s):")
    print(f"{'kind':<8}{'steps':>7}{'seqs/step':>11}{'host ms/step':>14}{'device ms/step':>16}"
          f"{'device s':>10}")
    for kind in ("decode", "prefill", "mixed"):
        rs = [r for r in records if r[0] == kind]
        if not rs:
            continue
        device = sum(r[3].elapsed_time(r[4]) for r in rs) / 1e3
        print(f"{kind:<8}{len(rs):>7}{sum(r[1] for r in rs) / len(rs):>11.1f}"
              f"{1e3 * sum(r[2] for r in rs) / len(rs):>14.3f}{1e3 * device / len(rs):>16.3f}"
              f"{device:>10.2f}")


def profile_workload(llm: Any, w: Workload, vocab: int) -> None:
    """Where a workload's time goes: its steps by kind, the device's busy time (every kernel's
    duration summed) against the wall clock, and the kernels that take most of it."""
    from torch.profiler import ProfilerActivity, profile

    step_kinds(llm, w, vocab)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        seconds = run_workload(llm, w, vocab, seed=7777)
    events = prof.key_averages()
    device_s = sum(e.self_device_time_total for e in events) / 1e6
    print(f"\nprofile {w.name}: wall {seconds:.2f} s, device busy {device_s:.2f} s "
          f"({100 * device_s / seconds:.0f}%)")
    print(events.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=60))


def bench_sampler(vocab: int) -> None:
    """The sampling step alone at the standard batch: greedy argmax, the kernel at several
    pivot counts, and the torch path's sort, on logits shaped like a model's."""
    from pagedserve.kernels.sampling import kept_threshold, sample_rows

    n = STANDARD[0]
    device = torch.device("cuda")
    logits = torch.randn(n, vocab, device=device) * 3
    t = torch.full((n,), 0.8, device=device)
    k = torch.full((n,), 50, dtype=torch.int64, device=device)
    p = torch.full((n,), 0.95, device=device)
    keys = torch.arange(n, device=device)
    pos = torch.zeros(n, dtype=torch.int64, device=device)

    def timed(fn: Any) -> float:
        fn()
        sync()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 20

    print(f"\nsampling {n} x {vocab}: argmax {timed(lambda: logits.argmax(-1)):.3f} ms; "
          f"torch sort path {timed(lambda: kept_threshold(logits, t, k, p)):.3f} ms")
    for block in (512, 1024, 4096):
        for pivots in (2, 4, 8):
            ms = timed(lambda b=block, pv=pivots: sample_rows(
                logits, t, keys, pos, k, p, block=b, pivots=pv))
            ms_p = timed(lambda b=block, pv=pivots: sample_rows(
                logits, t, keys, pos, None, p, block=b, pivots=pv))
            ms_t = timed(lambda b=block: sample_rows(logits, t, keys, pos, block=b))
            print(f"  kernel, tiles of {block:>4}, {pivots} pivots: top-k+top-p {ms:.3f} ms, "
                  f"top-p alone {ms_p:.3f} ms, temperature alone {ms_t:.3f} ms")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--models", default="1b,8b")
    parser.add_argument("--workloads", default="", help="comma-separated subset")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/perf-bench"))
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    parser.add_argument("--profile", default="", help="a workload to profile after the runs")
    parser.add_argument("--admission-groups", default="",
                        help="also run the mixed workload with these admission_group values")
    args = parser.parse_args()
    if args.smoke:
        use_smoke_settings()
    only = {x for x in args.workloads.split(",") if x}
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for name in args.models.split(","):
        groups = tuple(int(g) for g in args.admission_groups.split(",") if g)
        rows += bench_model(name, args.tokenizer, args.work, only, args.profile, groups)
        (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    by = {(r["model"], r["workload"]): r for r in rows}
    print("\n| model | workload | pagedserve | floor, same run | fraction |")
    print("| --- | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['workload']} | {r['value']:,.3f} {r['unit']} | "
              f"{r['floor_value']:,.3f} | {100 * r['fraction_of_floor']:.1f}% |")
    for model in args.models.split(","):
        g, s = by.get((model, "greedy")), by.get((model, "sampled"))
        if g and s:
            print(f"{model}: sampled / greedy = {s['value'] / g['value']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
