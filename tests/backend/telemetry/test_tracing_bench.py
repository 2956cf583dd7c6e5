"""``pagedserve bench serve --compare-tracing`` on the tiny model: both sides served the same
rounds, and the traced side's spans reached the collector process."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pagedserve.backend.cli import build_parser
from pagedserve.clients.loadgen import run_bench_serve

REQUESTS = 6
OUTPUT_LEN = 4
ROUNDS = 2


def test_compare_tracing_reports_both_sides(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tracing.json"
    args = build_parser().parse_args([
        "bench", "serve", "--model", str(tiny_llama_dir), "--num-blocks", "128",
        "--num-requests", str(REQUESTS), "--input-len", "16", "--output-len", str(OUTPUT_LEN),
        "--compare-tracing", "--repeat", str(ROUNDS), "--no-progress", "--json", str(out),
    ])
    assert run_bench_serve(args) == 0
    report = json.loads(out.read_text())
    for side in ("tracing_off", "tracing_on"):
        assert report[side]["completed"] == REQUESTS
        assert report[side]["total_output_tokens"] == REQUESTS * OUTPUT_LEN
        assert len(report[side]["rounds_output_throughput"]) == ROUNDS
    off, on = (report[s]["output_throughput"] for s in ("tracing_off", "tracing_on"))
    assert report["loss"] == pytest.approx(1 - on / off)
    received = re.search(r"collector: received (\d+) spans", capsys.readouterr().out)
    assert received is not None
    # Each traced request is a SERVER span and its three phases (the warm-ups too), plus steps.
    assert int(received.group(1)) > 4 * REQUESTS * ROUNDS


def test_compare_tracing_needs_the_in_process_server(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(
        ["bench", "serve", "--server", "127.0.0.1:1", "--compare-tracing", "--no-progress"]
    )
    assert run_bench_serve(args) == 2
    assert "--compare-tracing" in capsys.readouterr().err
