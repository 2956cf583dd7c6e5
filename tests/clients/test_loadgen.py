"""bench serve: workload and arrival statistics, and a real run against a server."""

from __future__ import annotations

import io
import json
import math
import re
import statistics
from pathlib import Path

import pytest

from pagedserve.backend.offline_cli import Workload
from pagedserve.backend.server.server import BackgroundServer
from pagedserve.clients.loadgen import (
    LoadPattern,
    ServeWorkload,
    percentile,
    run_bench_serve,
    run_load,
)

VOCAB = 1000
SPECIAL = {0, 1, 2}


def test_fixed_workload_is_bench_offlines_workload() -> None:
    ours = ServeWorkload(num_requests=5, input_len=20, output_len=7, seed=3)
    theirs = Workload(5, 20, 7, seed=3)
    assert ours.prompts(VOCAB, SPECIAL) == theirs.prompts(VOCAB, SPECIAL)
    assert ours.output_lens() == [7] * 5


def test_random_lengths_stay_in_range_and_keep_token_draws() -> None:
    workload = ServeWorkload(num_requests=200, input_len=40, output_len=10, range_ratio=0.5, seed=1)
    prompts = workload.prompts(VOCAB, SPECIAL)
    lengths = [len(p) for p in prompts]
    assert min(lengths) >= 20 and max(lengths) <= 60 and len(set(lengths)) > 10
    assert all(4 <= n <= 15 for n in workload.output_lens())
    assert not any(t in SPECIAL for p in prompts for t in p)


def test_poisson_and_gamma_gaps_have_the_requested_rate() -> None:
    n = 20000
    for burstiness in (1.0, 0.25, 4.0):
        gaps = LoadPattern(request_rate=50.0, burstiness=burstiness).gaps(n, seed=0)
        assert gaps[0] == 0.0
        mean = statistics.fmean(gaps[1:])
        assert mean == pytest.approx(1 / 50.0, rel=0.05)
        # Gamma(k, theta): coefficient of variation 1/sqrt(k). 1 is Poisson.
        cv = statistics.pstdev(gaps[1:]) / mean
        assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.1)
    assert LoadPattern().gaps(4, seed=0) == [0.0] * 4
    with pytest.raises(ValueError):
        LoadPattern(request_rate=0.0)
    with pytest.raises(ValueError):
        LoadPattern(burstiness=-1.0)


def test_percentile_interpolates_like_numpy() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile(values, 90) == pytest.approx(3.7)
    assert math.isnan(percentile([], 50))


async def test_run_load_measures_every_request(tiny_server: BackgroundServer) -> None:
    workload = ServeWorkload(num_requests=12, input_len=24, output_len=8, range_ratio=0.25)
    pattern = LoadPattern(request_rate=200.0, burstiness=0.5, max_concurrency=4)
    report = await run_load(tiny_server.address, workload, pattern, progress=False)
    assert report.completed == 12 and report.failed == 0 and not report.errors
    assert report.total_output_tokens == sum(workload.output_lens())
    assert report.total_input_tokens == sum(len(p) for p in workload.prompts(49152, {0, 1, 2}))
    assert report.output_throughput == pytest.approx(report.total_output_tokens / report.duration_s)
    assert report.request_throughput == pytest.approx(12 / report.duration_s)
    for stats in (report.ttft_ms, report.tpot_ms, report.itl_ms, report.e2e_ms):
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"]
    assert report.ttft_ms["p50"] < report.e2e_ms["p50"]


def test_bench_serve_command_writes_json(tiny_server: BackgroundServer, tmp_path: Path) -> None:
    from pagedserve.backend.cli import build_parser

    out = tmp_path / "serve.json"
    args = build_parser().parse_args(
        ["bench", "serve", "--server", tiny_server.address, "--num-requests", "6",
         "--input-len", "16", "--output-len", "5", "--no-progress", "--json", str(out)]
    )
    assert run_bench_serve(args) == 0
    report = json.loads(out.read_text())
    assert report["completed"] == 6 and report["total_output_tokens"] == 30
    assert report["pattern"]["request_rate"] is None  # inf: all at once
    assert set(report["itl_ms"]) == {"mean", "p50", "p90", "p99"}


def test_bench_serve_in_process_compares_with_offline(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from pagedserve.backend.cli import build_parser

    out = tmp_path / "serve.json"
    args = build_parser().parse_args(
        ["bench", "serve", "--model", str(tiny_llama_dir), "--num-blocks", "128",
         "--num-requests", "8", "--input-len", "32", "--output-len", "8",
         "--compare-offline", "--repeat", "2", "--no-progress", "--json", str(out)]
    )
    assert run_bench_serve(args) == 0
    report = json.loads(out.read_text())
    assert report["completed"] == 8 and report["total_output_tokens"] == 64
    assert len(report["rounds_output_throughput"]) == 2
    assert report["output_throughput"] == max(report["rounds_output_throughput"])
    assert len(report["rounds_offline_output_throughput"]) == 2
    assert report["offline_output_throughput"] == max(report["rounds_offline_output_throughput"])


async def test_a_repeated_run_reports_its_prefix_cache_hits(tiny_server: BackgroundServer) -> None:
    """The same prompts sent twice to one server: the second run's prefill comes from the prefix
    cache, and the report says so instead of passing it off as a fresh measurement."""
    workload = ServeWorkload(num_requests=4, input_len=40, output_len=2, seed=4242)
    first = await run_load(tiny_server.address, workload, LoadPattern(), progress=False)
    again = await run_load(tiny_server.address, workload, LoadPattern(), progress=False)
    assert first.total_cached_prompt_tokens == 0
    # Whole 16-token blocks only: 32 of each 40-token prompt.
    assert again.total_cached_prompt_tokens == 4 * 32
    shown = io.StringIO()
    again.print(shown)
    assert re.search(r"prefix-cached prompt tokens\s+128 \(80%\)", shown.getvalue())
    assert "--prompt-seed" in shown.getvalue()
    shown = io.StringIO()
    first.print(shown)
    assert "--prompt-seed" not in shown.getvalue()
