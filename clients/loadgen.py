"""``pagedserve bench serve``: load a server with streaming requests and measure latency.

Requests arrive at a given rate (Poisson, or gamma-distributed gaps for burstier traffic) or all
at once, optionally under a concurrency cap. Each is a random token-id prompt; with fixed
lengths the prompts are exactly those of ``pagedserve bench offline`` for the same seed, so
``--compare-offline`` can put the offline engine's output tokens/s beside the server's on the
same workload, measured in the same run.

``--api`` picks the API the load goes through: native gRPC Generate streams, or streamed
``/v1/completions`` of the OpenAI-compatible HTTP API (``openai_load``). Either way the
prompts, arrivals and statistics are this module's, so the two reports compare like for like.
The prompts' vocabulary comes from the gRPC ModelInfo in both cases: OpenAI's API does not say
it. The client side needs no torch; only an in-process server (no ``--server``) loads the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any, Literal, TextIO, get_args

import grpc

from pagedserve.clients.client import AsyncGenerationClient
from pagedserve.clients.load_record import RequestRecord
from pagedserve.clients.security import (
    ChannelSecurity,
    add_connection_args,
    connection_from_args,
)

Api = Literal["grpc", "openai"]
APIS: tuple[Api, ...] = get_args(Api)
# One measured request: (prompt token ids, max_tokens, ignore_eos) -> its record.
SendRequest = Callable[[list[int], int, bool], Awaitable[RequestRecord]]

PERCENTILES = (50, 90, 99)
_MS = 1000.0


@dataclass
class ServeWorkload:
    """What to send. ``range_ratio`` 0 means fixed lengths (the offline benchmark's workload);
    otherwise each length is drawn uniformly from ``[len * (1 - r), len * (1 + r)]``."""

    num_requests: int = 32
    input_len: int = 128
    output_len: int = 64
    range_ratio: float = 0.0
    seed: int = 0
    ignore_eos: bool = True

    def _lengths(self, base: int, salt: int) -> list[int]:
        if self.range_ratio == 0.0:
            return [base] * self.num_requests
        # A separate generator, so the token draws stay those of the fixed-length workload.
        rng = random.Random(self.seed * 1_000_003 + salt)
        low = max(1, math.floor(base * (1 - self.range_ratio)))
        high = max(low, math.ceil(base * (1 + self.range_ratio)))
        return [rng.randint(low, high) for _ in range(self.num_requests)]

    def prompts(self, vocab_size: int, special_ids: set[int]) -> list[list[int]]:
        """Random token ids, special tokens excluded, drawn in the offline benchmark's order."""
        rng = random.Random(self.seed)
        pool = [t for t in range(vocab_size) if t not in special_ids]
        return [[rng.choice(pool) for _ in range(n)] for n in self._lengths(self.input_len, 1)]

    def output_lens(self) -> list[int]:
        return self._lengths(self.output_len, 2)


@dataclass
class LoadPattern:
    """When requests are sent. ``request_rate`` inf sends them all at once. ``burstiness`` is
    the gamma shape of the gaps: 1 is Poisson, below 1 burstier, above 1 more regular."""

    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None

    def __post_init__(self) -> None:
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0, got {self.request_rate}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")

    def gaps(self, n: int, seed: int) -> list[float]:
        """Seconds to wait before each request (the first goes at once)."""
        if math.isinf(self.request_rate):
            return [0.0] * n
        rng = random.Random(seed)
        scale = 1.0 / (self.request_rate * self.burstiness)  # mean gap 1 / rate
        return [0.0] + [rng.gammavariate(self.burstiness, scale) for _ in range(n - 1)]


# Above this share of prompt tokens from the prefix cache, the report says so: the run did not
# measure prefill.
PREFIX_CACHE_NOTE_SHARE = 0.5


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), ``q`` in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Mean and percentiles in milliseconds."""
    stats = {"mean": sum(values) / len(values) * _MS if values else math.nan}
    stats.update({f"p{q}": percentile(values, q) * _MS for q in PERCENTILES})
    return stats


@dataclass
class BenchReport:
    workload: dict[str, Any]
    pattern: dict[str, Any]
    target: str
    duration_s: float
    completed: int
    failed: int
    total_input_tokens: int
    total_output_tokens: int
    # Prompt tokens the server took from its prefix cache: a run that repeats an earlier run's
    # prompts against the same server skips most of its prefill. None: the API does not say.
    total_cached_prompt_tokens: int | None
    request_throughput: float
    output_throughput: float
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]  # between messages of a stream; a message may carry several tokens
    e2e_ms: dict[str, float]
    errors: list[str]
    offline_output_throughput: float | None = None
    # Every round's output tokens/s when the run was repeated (the report is the best round).
    rounds_output_throughput: list[float] = field(default_factory=list)
    rounds_offline_output_throughput: list[float] = field(default_factory=list)
    api: Api = "grpc"

    @classmethod
    def best_of(cls, reports: list[BenchReport], offline: list[float]) -> BenchReport:
        """The fastest round, with every round's numbers beside it. On a shared machine the
        best round is the one least disturbed; both sides get the same treatment."""
        best = max(reports, key=lambda r: r.output_throughput)
        best.rounds_output_throughput = [r.output_throughput for r in reports]
        best.rounds_offline_output_throughput = list(offline)
        best.offline_output_throughput = max(offline) if offline else None
        return best

    @classmethod
    def from_records(
        cls,
        records: list[RequestRecord],
        duration_s: float,
        workload: ServeWorkload,
        pattern: LoadPattern,
        target: str,
        api: Api = "grpc",
    ) -> BenchReport:
        ok = [r for r in records if r.error is None]
        output_tokens = sum(r.output_tokens for r in ok)
        cached = [r.cached_prompt_tokens for r in ok]
        return cls(
            workload=asdict(workload),
            pattern={k: (None if v == math.inf else v) for k, v in asdict(pattern).items()},
            target=target,
            duration_s=duration_s,
            completed=len(ok),
            failed=len(records) - len(ok),
            total_input_tokens=sum(r.prompt_tokens for r in ok),
            total_output_tokens=output_tokens,
            total_cached_prompt_tokens=(
                None if None in cached else sum(c for c in cached if c is not None)
            ),
            request_throughput=len(ok) / duration_s,
            output_throughput=output_tokens / duration_s,
            ttft_ms=summarize([r.ttft for r in ok if r.ttft is not None]),
            tpot_ms=summarize([t for r in ok if (t := r.tpot) is not None]),
            itl_ms=summarize([x for r in ok for x in r.itls]),
            e2e_ms=summarize([r.latency for r in ok if r.latency is not None]),
            errors=sorted({r.error for r in records if r.error is not None}),
            api=api,
        )

    def print(self, out: TextIO | None = None) -> None:
        """To ``out``, by default the ``sys.stdout`` of the moment (not of import time)."""
        out = out or sys.stdout
        w = self.workload
        rate = self.pattern["request_rate"]
        print(
            f"\nworkload: {w['num_requests']} requests x {w['input_len']} prompt / "
            f"{w['output_len']} output tokens (range ratio {w['range_ratio']}), "
            f"ignore_eos={w['ignore_eos']}, greedy; rate {'inf' if rate is None else rate} req/s, "
            f"burstiness {self.pattern['burstiness']}, "
            f"max concurrency {self.pattern['max_concurrency'] or 'none'}; server {self.target} "
            f"({self.api} API)",
            file=out,
        )
        print(f"{'completed / failed':<28}{self.completed} / {self.failed}", file=out)
        print(f"{'duration (s)':<28}{self.duration_s:.2f}", file=out)
        print(f"{'request throughput (req/s)':<28}{self.request_throughput:.2f}", file=out)
        print(f"{'output tokens/s':<28}{self.output_throughput:.1f}", file=out)
        cached = self.total_cached_prompt_tokens
        share = cached / self.total_input_tokens if cached and self.total_input_tokens else 0.0
        shown = "not reported by this API" if cached is None else f"{cached} ({share:.0%})"
        print(f"{'prefix-cached prompt tokens':<28}{shown}", file=out)
        if share > PREFIX_CACHE_NOTE_SHARE:
            print(
                "note: most prompt tokens came from the server's prefix cache (an earlier run "
                "sent the same prompts?); --prompt-seed N sends fresh ones",
                file=out,
            )
        if len(self.rounds_output_throughput) > 1:
            rounds = ", ".join(f"{x:.1f}" for x in self.rounds_output_throughput)
            print(f"{'rounds (best shown)':<28}{rounds}", file=out)
        if self.offline_output_throughput is not None:
            ratio = self.output_throughput / self.offline_output_throughput
            print(f"{'offline output tokens/s':<28}{self.offline_output_throughput:.1f}", file=out)
            if len(self.rounds_offline_output_throughput) > 1:
                rounds = ", ".join(f"{x:.1f}" for x in self.rounds_offline_output_throughput)
                print(f"{'offline rounds':<28}{rounds}", file=out)
            print(f"{'serve / offline':<28}{ratio:.2f}", file=out)
        quantiles = "".join(f"{'p' + str(q):>10}" for q in PERCENTILES)
        header = f"{'latency (ms)':<28}{'mean':>10}{quantiles}"
        print(header, file=out)
        for name, stats in (
            ("TTFT", self.ttft_ms),
            ("TPOT", self.tpot_ms),
            ("ITL (per message)", self.itl_ms),
            ("end-to-end", self.e2e_ms),
        ):
            row = "".join(f"{stats[k]:>10.1f}" for k in ("mean", *(f"p{q}" for q in PERCENTILES)))
            print(f"{name:<28}{row}", file=out)
        for error in self.errors:
            print(f"error: {error}", file=out)


async def _one_request(
    client: AsyncGenerationClient, prompt: list[int], max_tokens: int, ignore_eos: bool
) -> RequestRecord:
    record = RequestRecord(prompt_tokens=len(prompt))
    start = time.perf_counter()
    last = start
    try:
        call = client.generate(
            prompt_token_ids=prompt,
            max_tokens=max_tokens,
            temperature=0.0,
            ignore_eos=ignore_eos,
        )
        async for response in call:
            if response.HasField("usage"):
                record.cached_prompt_tokens = response.usage.cached_prompt_tokens
            if not response.token_ids:
                continue
            now = time.perf_counter()
            if record.ttft is None:
                record.ttft = now - start
            else:
                record.itls.append(now - last)
            last = now
            record.output_tokens += len(response.token_ids)
        record.latency = time.perf_counter() - start
    except grpc.aio.AioRpcError as error:
        record.error = f"{error.code().name}: {error.details()}"
    return record


@asynccontextmanager
async def _sender(
    api: Api, target: str, client: AsyncGenerationClient, model: str,
    connection: Mapping[str, Any],
) -> AsyncIterator[SendRequest]:
    """How one request goes out: on ``client``'s channel, or over HTTP to ``target``."""
    if api == "grpc":
        yield partial(_one_request, client)
        return
    from pagedserve.clients.openai_load import CompletionsTarget, OpenAICompletions

    security = ChannelSecurity(**connection)
    async with OpenAICompletions(CompletionsTarget(target, model, security)) as completions:
        yield completions.request


async def run_load(
    target: str,
    workload: ServeWorkload,
    pattern: LoadPattern,
    *,
    progress: bool = True,
    connection: Mapping[str, Any] | None = None,
    api: Api = "grpc",
    model_info_target: str | None = None,
) -> BenchReport:
    """Send the workload to ``target`` through ``api`` and measure every request.

    ``connection``: the client's TLS and API key arguments (``AsyncGenerationClient(target,
    **connection)``), the same for HTTP. ``model_info_target``: the gRPC address asked for the
    model's vocabulary and name; ``target`` itself for gRPC, required for the OpenAI API (its
    ``target`` is the HTTP API's ``host:port``)."""
    if api not in APIS:
        raise ValueError(f"api must be one of {', '.join(APIS)}, got {api!r}")
    if api == "openai" and model_info_target is None:
        raise ValueError("the OpenAI API needs the server's gRPC address for the model's "
                         "vocabulary (--grpc-server)")
    connection = connection or {}
    info_target = model_info_target or target
    async with AsyncGenerationClient(info_target, **connection) as client:
        await client.wait_until_serving()
        info = await client.model_info()
        special = set(info.special_token_ids)
        prompts = workload.prompts(info.vocab_size, special)
        async with _sender(api, target, client, info.model_name, connection) as one_request:
            # Warm up on other prompts, as the offline benchmark does (no prefix-cache help).
            warmup = ServeWorkload(
                num_requests=2, input_len=16, output_len=4, seed=workload.seed + 1
            )
            await asyncio.gather(
                *(one_request(p, 4, True) for p in warmup.prompts(info.vocab_size, special))
            )
            records, duration = await _timed_load(
                one_request, prompts, workload, pattern, progress
            )
    return BenchReport.from_records(records, duration, workload, pattern, target, api)


async def _timed_load(
    one_request: SendRequest,
    prompts: list[list[int]],
    workload: ServeWorkload,
    pattern: LoadPattern,
    progress: bool,
) -> tuple[list[RequestRecord], float]:
    """Every request sent on the pattern's schedule; their records and the wall time."""
    from tqdm.auto import tqdm

    limit = asyncio.Semaphore(pattern.max_concurrency or len(prompts) or 1)
    bar = tqdm(total=len(prompts), desc="bench serve", unit="req", disable=not progress)

    async def send(prompt: list[int], max_tokens: int) -> RequestRecord:
        async with limit:
            record = await one_request(prompt, max_tokens, workload.ignore_eos)
        bar.update(1)
        return record

    tasks: list[asyncio.Task[RequestRecord]] = []
    start = time.perf_counter()
    for gap, prompt, max_tokens in zip(
        pattern.gaps(len(prompts), workload.seed), prompts, workload.output_lens()
    ):
        if gap:
            await asyncio.sleep(gap)
        tasks.append(asyncio.create_task(send(prompt, max_tokens)))
    records = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    bar.close()
    return list(records), duration


def offline_output_throughput(llm: Any, workload: ServeWorkload) -> float:
    """``pagedserve bench offline``'s number for the same workload, on ``llm``."""
    from pagedserve.backend.offline_cli import Workload, bench_pagedserve

    if workload.range_ratio != 0.0 or not workload.ignore_eos:
        raise ValueError("the offline comparison needs fixed lengths and ignore_eos")
    offline = Workload(workload.num_requests, workload.input_len, workload.output_len, workload.seed)
    return bench_pagedserve(llm, offline).output_tokens_per_s


def _in_process_report(
    args: argparse.Namespace, workload: ServeWorkload, pattern: LoadPattern
) -> BenchReport:
    """Serve from a server in this process; with ``--compare-offline`` alternate each round
    with the offline engine on the same prompts, so both see the same machine conditions."""
    from pagedserve.backend.cli import engine_config_from_args
    from pagedserve.backend.config import ServerConfig, TelemetryConfig
    from pagedserve.backend.llm import LLM
    from pagedserve.backend.server.server import BackgroundServer

    engine_config = engine_config_from_args(args)
    engines = 2 if args.compare_offline else 1
    llm = LLM.from_config(engine_config.sharing_device(0, engines)) if args.compare_offline else None
    reports: list[BenchReport] = []
    offline: list[float] = []
    openai = args.api == "openai"
    config = ServerConfig(
        host="127.0.0.1", port=0, http_port=0 if openai else None,
        telemetry=TelemetryConfig(metrics_port=0),
    )
    with BackgroundServer(config, engine_config.sharing_device(engines - 1, engines)) as server:
        server.wait_ready()
        target = server.http_address if openai else server.address
        for round_index in range(args.repeat):
            # Fresh prompts each round: no prefix-cache help from the round before.
            prompts = replace(workload, seed=workload.seed + round_index)
            run = run_load(
                target, prompts, pattern, progress=args.progress, api=args.api,
                model_info_target=server.address,
            )
            reports.append(asyncio.run(run))
            if llm is not None:
                offline.append(offline_output_throughput(llm, prompts))
    return BenchReport.best_of(reports, offline)


def run_bench_serve(args: argparse.Namespace) -> int:
    workload = ServeWorkload(
        num_requests=args.num_requests,
        input_len=args.input_len,
        output_len=args.output_len,
        range_ratio=args.range_ratio,
        seed=args.prompt_seed,
        ignore_eos=args.ignore_eos,
    )
    pattern = LoadPattern(args.request_rate, args.burstiness, args.max_concurrency)
    refusal = _api_flags_refusal(args)
    if refusal is not None:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    if args.compare_tracing and not args.server:
        from pagedserve.backend.telemetry.tracing_bench import run_tracing_comparison

        return run_tracing_comparison(args, workload, pattern)
    if args.server:
        if args.compare_offline or args.compare_tracing or args.repeat != 1:
            print("--compare-offline, --compare-tracing and --repeat need the in-process server "
                  "(no --server)",
                  file=sys.stderr)
            return 2
        try:
            connection = connection_from_args(args)
            run = run_load(
                args.server, workload, pattern, progress=args.progress, connection=connection,
                api=args.api, model_info_target=args.grpc_server,
            )
            report = asyncio.run(run)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except grpc.aio.AioRpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    else:
        report = _in_process_report(args, workload, pattern)
    report.print()
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(asdict(report), f, indent=2)
    return 0 if report.failed == 0 else 1


def _api_flags_refusal(args: argparse.Namespace) -> str | None:
    """Why ``--api`` and the flags that go with it do not fit together, if they do not."""
    if args.api == "grpc":
        if args.grpc_server is not None:
            return "--grpc-server is for --api openai (with --api grpc, --server is gRPC)"
        return None
    if args.compare_tracing:
        return "--compare-tracing measures the gRPC API only"
    if args.server and args.grpc_server is None:
        return ("--api openai --server HOST:PORT (the HTTP API) needs --grpc-server HOST:PORT "
                "too: the model's vocabulary comes from its gRPC ModelInfo")
    if not args.server and args.grpc_server is not None:
        return "--grpc-server goes with --server (the in-process server knows its own)"
    return None


def register_bench_serve(bench_sub: Any) -> None:
    """``pagedserve bench serve``, added under the ``bench`` command."""
    from pagedserve.backend.cli import add_engine_args

    p = bench_sub.add_parser(
        "serve",
        help="load a server with streaming requests (gRPC or the OpenAI HTTP API); "
        "throughput and latency percentiles",
    )
    p.add_argument(
        "--api", choices=APIS, default="grpc",
        help="grpc: native Generate streams; openai: streamed /v1/completions over HTTP "
        "(token-id prompts, usage for the exact token count)",
    )
    p.add_argument(
        "--server", default=None, metavar="HOST:PORT",
        help="target a running server, its gRPC port or with --api openai its HTTP port "
        "(default: start one in this process with the engine flags)",
    )
    p.add_argument(
        "--grpc-server", default=None, metavar="HOST:PORT",
        help="with --api openai --server: the same server's gRPC port, asked for the model's "
        "vocabulary and name (OpenAI's API does not tell them)",
    )
    p.add_argument("--num-requests", type=int, default=32, help="requests to send")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=64, help="output tokens per request")
    p.add_argument(
        "--range-ratio", type=float, default=0.0,
        help="random lengths in [len*(1-r), len*(1+r)]; 0 keeps them fixed",
    )
    p.add_argument("--prompt-seed", type=int, default=0, help="seed of prompts and arrivals")
    p.add_argument(
        "--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
        help="generate exactly the output length",
    )
    p.add_argument(
        "--request-rate", type=float, default=math.inf, help="requests/s (default inf: all at once)"
    )
    p.add_argument(
        "--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1: Poisson)"
    )
    p.add_argument(
        "--max-concurrency", type=int, default=None,
        help="requests in flight at most (default: no bound)",
    )
    p.add_argument(
        "--compare-offline", action="store_true",
        help="also run bench offline's pagedserve measurement on the same workload",
    )
    p.add_argument(
        "--compare-tracing", action="store_true",
        help="in-process: tracing off vs on (OTLP to a local collector), rounds alternating",
    )
    p.add_argument(
        "--repeat", type=int, default=1,
        help="rounds on fresh prompts (in-process only); the best round is reported",
    )
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True,
        help="a progress bar on stderr",
    )
    p.add_argument("--json", dest="json_out", default=None, help="write the report to this file")
    add_connection_args(p, note="with --server")
    add_engine_args(p)
    p.set_defaults(func=run_bench_serve)

