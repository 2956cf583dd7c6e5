"""`pagedserve generate` (one-off, streamed to the terminal) and `pagedserve bench offline`."""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from pagedserve.backend.cli import add_engine_args, add_log_level_arg, engine_config_from_args
from pagedserve.clients.cli import add_sampling_args
from pagedserve.clients.security import add_connection_args

# One answer's budget for `generate`.
GENERATE_MAX_TOKENS = 128


def register_generate(sub: Any) -> None:
    p = sub.add_parser(
        "generate", help="generate text for one prompt, streamed as it arrives",
        description="Generate a reply to one prompt, here (the model loads in this process) or "
        "on a running server (--server). Ctrl-C stops it.",
    )
    p.add_argument("prompt", help="the prompt; a chat message unless --raw")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, not as a chat message")
    p.add_argument(
        "--server", default=None, metavar="HOST:PORT",
        help="ask a running pagedserve server instead of loading the model here",
    )
    add_sampling_args(p, max_tokens=GENERATE_MAX_TOKENS)
    add_log_level_arg(p)
    add_connection_args(p, note="with --server")
    add_engine_args(p)
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    if args.server:
        from pagedserve.clients.cli import run_generate_remote

        return run_generate_remote(args)
    from pagedserve.backend.llm import LLM
    from pagedserve.backend.sampling_params import SamplingParams

    config = engine_config_from_args(args)
    llm = LLM.from_config(config)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.sampling_seed,
    )
    engine = llm.engine
    if args.raw:
        ids = engine.builder.tokenize(args.prompt)
    else:
        ids = engine.builder.render_chat([{"role": "user", "content": args.prompt}])
    for delta in llm.stream(prompt_token_ids=ids, sampling_params=params):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


# -- bench offline ----------------------------------------------------------------------------
@dataclass
class Workload:
    num_requests: int
    input_len: int
    output_len: int
    seed: int = 0

    def prompts(self, vocab_size: int, special_ids: set[int]) -> list[list[int]]:
        """Random token-id prompts of exactly ``input_len`` tokens (no special tokens)."""
        rng = random.Random(self.seed)
        pool = [t for t in range(vocab_size) if t not in special_ids]
        return [[rng.choice(pool) for _ in range(self.input_len)] for _ in range(self.num_requests)]


@dataclass
class BenchResult:
    system: str
    seconds: float
    output_tokens: int

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.seconds


def register_bench(sub: Any) -> None:
    p = sub.add_parser("bench", help="benchmarks: offline throughput, or load on a server")
    bench_sub = p.add_subparsers(
        dest="bench_command", required=True, metavar="BENCHMARK", title="benchmarks"
    )
    off = bench_sub.add_parser("offline", help="offline throughput, beside transformers")
    off.add_argument("--num-requests", type=int, default=32, help="requests in the batch")
    off.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    off.add_argument("--output-len", type=int, default=64, help="output tokens per request")
    off.add_argument(
        "--peer", choices=["transformers", "transformers-cb", "none"], default="transformers",
        help="transformers: batched generate(); transformers-cb: its continuous batching "
        "(generate_batch); none: pagedserve only",
    )
    off.add_argument("--json", dest="json_out", default=None, help="write results to this file")
    add_log_level_arg(off)
    add_engine_args(off)
    off.set_defaults(func=run_bench_offline)
    for register in _extra_bench_registrations():
        register(bench_sub)


def _extra_bench_registrations() -> list[Any]:
    try:
        from pagedserve.clients.loadgen import register_bench_serve
    except ImportError:
        return []
    return [register_bench_serve]


def run_bench_offline(args: argparse.Namespace) -> int:
    from pagedserve.backend.llm import LLM

    config = engine_config_from_args(args)
    workload = Workload(args.num_requests, args.input_len, args.output_len)
    llm = LLM.from_config(config)
    target = PeerTarget.of(llm)
    results = [bench_pagedserve(llm, workload)]
    del llm  # give its KV cache back before the peer loads its own copy of the model
    release_memory(target.device)
    if args.peer != "none":
        results.append(bench_transformers(target, workload, continuous=args.peer == "transformers-cb"))
    print_table(workload, results, device=str(target.device))
    if args.json_out:
        write_json(args.json_out, workload, results, str(target.device))
    return 0


def write_json(path: str, workload: Workload, results: list[BenchResult], device: str) -> None:
    with open(path, "w") as f:
        json.dump(
            {
                "workload": asdict(workload),
                "device": device,
                "results": [{**asdict(r), "output_tokens_per_s": r.output_tokens_per_s} for r in results],
            },
            f,
            indent=2,
        )


def release_memory(device: Any) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _special_ids(tokenizer: Any) -> set[int]:
    return set(getattr(tokenizer, "all_special_ids", []) or [])


@dataclass
class PeerTarget:
    """What the peer needs to run the same model the same way, without our engine alive."""

    hf_config: Any
    model_dir: Any
    dummy: bool
    dtype: Any
    device: Any
    vocab_size: int
    special_ids: set[int]

    @classmethod
    def of(cls, llm: Any) -> PeerTarget:
        runner = llm.engine.runner
        return cls(
            hf_config=runner.loaded.hf_config,
            model_dir=runner.loaded.model_dir,
            dummy=runner.config.model.load_format == "dummy",
            dtype=runner.dtype,
            device=runner.device,
            vocab_size=llm.engine.vocab_size,
            special_ids=_special_ids(llm.engine.tokenizer),
        )


def _warmup(workload: Workload) -> Workload:
    """Two requests at the workload's prompt length, on other prompts: the kernels and
    shapes the timed prefill uses are built before the clock starts (a GPU compiles kernels on
    first use; a 16-token warm-up left them to the timed run)."""
    return Workload(2, workload.input_len, 4, seed=workload.seed + 1)


def bench_pagedserve(llm: Any, workload: Workload) -> BenchResult:
    from pagedserve.backend.sampling_params import SamplingParams

    engine = llm.engine
    special = _special_ids(engine.tokenizer)
    prompts = workload.prompts(engine.vocab_size, special)
    params = SamplingParams(
        max_tokens=workload.output_len, temperature=0.0, ignore_eos=True, detokenize=False
    )
    # Warm up on other prompts, so the timed run gets no prefix-cache hits from it.
    llm.generate(
        prompt_token_ids=_warmup(workload).prompts(engine.vocab_size, special),
        sampling_params=SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False),
    )
    sync = _synchronizer(engine.runner.device)
    sync()
    start = time.perf_counter()
    outputs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    sync()
    seconds = time.perf_counter() - start
    return BenchResult("pagedserve", seconds, sum(len(o.token_ids) for o in outputs))


def _synchronizer(device: Any) -> Any:
    import torch

    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def bench_transformers(target: PeerTarget, workload: Workload, continuous: bool) -> BenchResult:
    """The same workload through transformers: same weights (random ones for dummy), dtype, device."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if target.dummy or target.model_dir is None:
        with target.device:  # initialise the random weights where they will run
            model = AutoModelForCausalLM.from_config(target.hf_config, dtype=target.dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(target.model_dir), dtype=target.dtype)
    model = model.to(target.device).eval()
    prompts = workload.prompts(target.vocab_size, target.special_ids)
    gen = GenerationConfig(
        max_new_tokens=workload.output_len, min_new_tokens=workload.output_len,
        do_sample=False, eos_token_id=None, pad_token_id=0,
    )
    sync = _synchronizer(target.device)
    warmup = _warmup(workload).prompts(target.vocab_size, target.special_ids)
    # no_grad, not inference_mode: generate_batch updates its own buffers in place.
    with torch.no_grad():
        if continuous:
            model.generate_batch(inputs=warmup, generation_config=gen)
            sync()
            start = time.perf_counter()
            out = model.generate_batch(inputs=prompts, generation_config=gen)
            sync()
            seconds = time.perf_counter() - start
            tokens = sum(len(v.generated_tokens) for v in out.values())
        else:
            short = GenerationConfig(max_new_tokens=4, do_sample=False, pad_token_id=0)
            model.generate(torch.tensor(warmup, device=target.device), generation_config=short)
            ids = torch.tensor(prompts, device=target.device)
            sync()
            start = time.perf_counter()
            out_ids = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen)
            sync()
            seconds = time.perf_counter() - start
            tokens = (out_ids.shape[1] - ids.shape[1]) * ids.shape[0]
    name = "transformers generate_batch" if continuous else "transformers generate"
    return BenchResult(name, seconds, int(tokens))


def print_table(workload: Workload, results: list[BenchResult], device: str) -> None:
    print(
        f"\nworkload: {workload.num_requests} requests x {workload.input_len} prompt / "
        f"{workload.output_len} output tokens, ignore_eos, greedy; device {device}"
    )
    print(f"{'system':<32}{'seconds':>10}{'output tok/s':>16}")
    for r in results:
        print(f"{r.system:<32}{r.seconds:>10.2f}{r.output_tokens_per_s:>16.1f}")
    if len(results) > 1 and results[1].output_tokens_per_s > 0:
        print(f"ratio pagedserve / peer: {results[0].output_tokens_per_s / results[1].output_tokens_per_s:.2f}x")
