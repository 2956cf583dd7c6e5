"""``pagedserve traces`` end to end: the command runs as a user runs it, a server started from
its own flags exports to it over OTLP/gRPC, and the printed tree is the request's span tree."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from pagedserve.backend.cli import build_parser, engine_config_from_args
from pagedserve.backend.server.cli import server_config_from_args
from pagedserve.backend.server.server import BackgroundServer
from pagedserve.backend.telemetry.trace_viewer import TracePrinter
from pagedserve.clients.client import GenerationClient
from tests.backend.server.harness import READY_TIMEOUT_S, TINY_ENGINE

WAIT_S = 30.0
MAX_TOKENS = 5


def test_a_served_request_prints_as_its_span_tree(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    viewer = subprocess.Popen(
        [sys.executable, "-m", "pagedserve.backend.cli", "traces", "--port", "0", "--count", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert viewer.stdout is not None
        first = viewer.stdout.readline()
        match = re.match(r"listening on (http://127\.0\.0\.1:\d+) ", first)
        assert match, first
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # ms; the default is 5 s
        engine_flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_ENGINE.items()]
        args = build_parser().parse_args([
            "serve", "--model", str(tiny_llama_dir), "--host", "127.0.0.1", "--port", "0",
            "--http-port", "0", "--metrics-port", "0", "--otlp-traces-endpoint", match[1],
            *engine_flags,
        ])
        with BackgroundServer(server_config_from_args(args), engine_config_from_args(args)) as server:
            server.wait_ready(READY_TIMEOUT_S)
            with GenerationClient(server.address) as client:
                responses = list(client.generate("Once upon", max_tokens=MAX_TOKENS, ignore_eos=True))
            out, _ = viewer.communicate(timeout=WAIT_S)  # --count 1: it exits after one tree
    finally:
        viewer.kill()
    assert viewer.returncode == 0, out
    lines = out.splitlines()
    assert re.fullmatch(r"trace [0-9a-f]{32}", lines[0]), out
    root = lines[1]
    assert root.startswith("pagedserve.v1.GenerationService/Generate  SERVER  "), out
    assert f"gen_ai.usage.output_tokens={MAX_TOKENS}" in root
    assert f"gen_ai.response.id={responses[0].request_id}" in root
    # The phases, one level down, in the order they ran, each with its duration.
    phases = [re.match(r"  (\w+)  (\d+\.\d) ms", line) for line in lines[2:5]]
    assert [m[1] for m in phases if m] == ["queue", "prefill", "decode"], out
    assert len(lines) == 5, out


def _span(name: str, span_id: int, parent: int, start: int, kind: int = Span.SPAN_KIND_INTERNAL) -> Span:
    span = Span(name=name, trace_id=b"\x01" * 16, span_id=span_id.to_bytes(8, "big"),
                start_time_unix_nano=start, end_time_unix_nano=start + 2_500_000, kind=kind)
    if parent:
        span.parent_span_id = parent.to_bytes(8, "big")
    return span


def test_children_exported_before_the_server_span_join_its_tree(tmp_path: Path) -> None:
    """The batch processor may export a request's phases before its SERVER span, and engine
    step spans arrive on their own: the tree prints once, when the SERVER span comes."""
    with open(tmp_path / "out.txt", "w+") as out:
        printer = TracePrinter(out, attributes=False)
        decode = _span("decode", 3, parent=1, start=20)
        nested = _span("detail", 4, parent=3, start=25)
        assert printer.add([decode, nested, _span("engine.step", 9, parent=0, start=5)]) == 0
        queue = _span("queue", 2, parent=1, start=10)
        root = _span("Generate", 1, parent=0, start=0, kind=Span.SPAN_KIND_SERVER)
        root.events.add(name="preempted", time_unix_nano=1_000_000)
        assert printer.add([queue, root]) == 1
        out.seek(0)
        assert out.read().splitlines() == [
            f"trace {'01' * 16}",
            "Generate  SERVER  2.5 ms",
            "  ! preempted at +1.0 ms",
            "  queue  2.5 ms",
            "  decode  2.5 ms",
            "    detail  2.5 ms",
        ]
    assert printer.num_step_spans == 1
