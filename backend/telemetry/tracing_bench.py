"""``pagedserve bench serve --compare-tracing``: the serving benchmark with tracing off and on.

Two in-process servers on the same engine flags, one without tracing and one exporting every
span (request trees and engine steps) over OTLP/gRPC to a collector in a child process, so the
server pays for the export as it would in production but not for the collector's work. Rounds
alternate between them on the same fresh prompts (who goes first alternates too), so both see
the same machine conditions; each side reports its best round, with every round beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace

from pagedserve.backend.config import ServerConfig, TelemetryConfig
from pagedserve.clients.loadgen import BenchReport, LoadPattern, ServeWorkload, run_load

_COLLECTOR_START_S = 30.0
_LISTENING = "listening "


@contextmanager
def collector_process() -> Iterator[str]:
    """``python -m pagedserve.backend.telemetry.collector`` on a free loopback port."""
    process = subprocess.Popen(
        [sys.executable, "-m", "pagedserve.backend.telemetry.collector", "--port", "0"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith(_LISTENING):
            raise RuntimeError(f"the trace collector did not start: {line!r}")
        yield f"http://127.0.0.1:{int(line[len(_LISTENING):])}"
    finally:
        process.terminate()
        out, _ = process.communicate(timeout=_COLLECTOR_START_S)
        print(f"collector: {out.strip()}")


def compare_tracing(
    args: argparse.Namespace, workload: ServeWorkload, pattern: LoadPattern
) -> tuple[BenchReport, BenchReport]:
    """(tracing off, tracing on) reports for the same workload and rounds."""
    from pagedserve.backend.cli import engine_config_from_args
    from pagedserve.backend.server.server import BackgroundServer

    engine_config = engine_config_from_args(args)
    reports: dict[bool, list[BenchReport]] = {False: [], True: []}
    with collector_process() as endpoint:
        servers = {
            traced: BackgroundServer(
                ServerConfig(
                    host="127.0.0.1", port=0, http_port=None,
                    telemetry=TelemetryConfig(
                        metrics_port=0, otlp_traces_endpoint=endpoint if traced else None
                    ),
                ),
                engine_config.sharing_device(index, 2),
            )
            for index, traced in enumerate((False, True))
        }
        try:
            for server in servers.values():  # one after another: each sizes its KV cache
                server.start()
                server.wait_ready()
            assert servers[True].state.telemetry.tracing
            assert not servers[False].state.telemetry.tracing
            for round_index in range(args.repeat):
                prompts = replace(workload, seed=workload.seed + round_index)
                order = (False, True) if round_index % 2 == 0 else (True, False)
                for traced in order:
                    run = run_load(servers[traced].address, prompts, pattern, progress=args.progress)
                    reports[traced].append(asyncio.run(run))
        finally:
            for server in servers.values():
                server.stop()
    return BenchReport.best_of(reports[False], []), BenchReport.best_of(reports[True], [])


def run_tracing_comparison(
    args: argparse.Namespace, workload: ServeWorkload, pattern: LoadPattern
) -> int:
    off, on = compare_tracing(args, workload, pattern)
    for title, report in (("tracing off", off), ("tracing on (OTLP/gRPC to a local collector)", on)):
        print(f"\n== {title}")
        report.print()
    loss = 1.0 - on.output_throughput / off.output_throughput
    print(
        f"\noutput tokens/s, best round: off {off.output_throughput:.1f}, "
        f"on {on.output_throughput:.1f}; loss with tracing {loss * 100:.1f}%"
    )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"tracing_off": asdict(off), "tracing_on": asdict(on), "loss": loss}, f,
                      indent=2)
    return 0 if off.failed == 0 and on.failed == 0 else 1
