"""bench serve --api openai: streamed /v1/completions against a real server, its flags, and
every way a request can fail (a status, an in-stream error, a cut stream) counted as a failure."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from pagedserve.backend.server.server import BackgroundServer
from pagedserve.clients.load_record import RequestRecord
from pagedserve.clients.loadgen import LoadPattern, ServeWorkload, run_bench_serve, run_load
from pagedserve.clients.openai_load import (
    Chunk,
    CompletionsTarget,
    OpenAICompletions,
    SseDecoder,
    read_chunk,
)

TINY_VOCAB = 49152


def test_sse_decoder_gives_whole_events_however_the_bytes_are_cut() -> None:
    stream = (
        b": a comment\n\ndata: {\"a\": 1}\n\n"
        b"data: first line\r\ndata:second line\r\n\r\n"
        b"event: other\nid: 7\n\n"
        b"data: [DONE]\n\n"
    )
    expected = [b'{"a": 1}', b"first line\nsecond line", b"[DONE]"]
    assert SseDecoder().feed(stream) == expected
    for size in (1, 2, 5, 13):
        decoder = SseDecoder()
        events = [e for i in range(0, len(stream), size) for e in decoder.feed(stream[i:i + size])]
        assert events == expected, size
    cut = SseDecoder()
    assert cut.feed(b"data: {\"a\"") == [] and cut.feed(b"}\n\n") == [b'{"a"}']


@pytest.mark.parametrize(
    ("chunk", "expected"),
    [
        # Token text that spells the very markers the fast path looks for.
        ({"id": "c", "choices": [{"index": 0, "text": '"choices":[] ,"usage":null}'}],
         "usage": None}, Chunk(has_choices=True)),
        ({"id": "c", "choices": [], "usage": None}, Chunk(has_choices=False)),
        ({"id": "c", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 7}},
         Chunk(has_choices=False, completion_tokens=7)),
        ({"id": "c", "choices": [{"index": 0, "text": "x"}]}, Chunk(has_choices=True)),
        ({"error": {"message": "gone", "type": "server_error"}, "usage": None},
         Chunk(has_choices=False, error="in-stream error: server_error: gone")),
    ],
)
def test_a_chunk_reads_the_same_compact_or_spaced(chunk: dict[str, Any], expected: Chunk) -> None:
    """The compact form (pagedserve's) may take the fast path, any other form is parsed:
    both say the same."""
    compact = json.dumps(chunk, separators=(",", ":")).encode()
    spaced = json.dumps(chunk, indent=1).encode()
    assert read_chunk(compact) == expected
    assert read_chunk(spaced) == expected


def test_a_malformed_chunk_is_an_error() -> None:
    for payload in (b"{not json", b'{"usage": {"prompt_tokens": 1}}', b"[1, 2]"):
        with pytest.raises(ValueError, match="malformed chunk"):
            read_chunk(payload)


async def test_openai_api_load_counts_every_token_exactly(tiny_server: BackgroundServer) -> None:
    workload = ServeWorkload(num_requests=12, input_len=24, output_len=8, range_ratio=0.25)
    pattern = LoadPattern(request_rate=200.0, burstiness=0.5, max_concurrency=4)
    report = await run_load(
        tiny_server.http_address, workload, pattern, progress=False, api="openai",
        model_info_target=tiny_server.address,
    )
    assert report.api == "openai"
    assert report.completed == 12 and report.failed == 0 and not report.errors
    assert report.total_output_tokens == sum(workload.output_lens())
    assert report.total_input_tokens == sum(len(p) for p in workload.prompts(TINY_VOCAB, {0, 1, 2}))
    assert report.total_cached_prompt_tokens is None  # the OpenAI usage does not say
    assert report.output_throughput == pytest.approx(report.total_output_tokens / report.duration_s)
    for stats in (report.ttft_ms, report.tpot_ms, report.itl_ms, report.e2e_ms):
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"]
    assert report.ttft_ms["p50"] < report.e2e_ms["p50"] < report.duration_s * 1000


def _bench(*flags: str) -> int:
    from pagedserve.backend.cli import build_parser

    return run_bench_serve(build_parser().parse_args(["bench", "serve", *flags]))


def test_bench_serve_api_openai_reports_the_requested_tokens(
    tiny_server: BackgroundServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "serve.json"
    code = _bench(
        "--api", "openai", "--server", tiny_server.http_address,
        "--grpc-server", tiny_server.address, "--num-requests", "6", "--input-len", "16",
        "--output-len", "5", "--no-progress", "--json", str(out),
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert report["api"] == "openai" and report["failed"] == 0
    assert report["completed"] == 6 and report["total_output_tokens"] == 30
    assert report["total_input_tokens"] == 96
    shown = capsys.readouterr().out
    assert "(openai API)" in shown
    assert re.search(r"prefix-cached prompt tokens\s+not reported by this API", shown)


def test_bench_serve_api_openai_counts_refused_requests_as_failures(
    tiny_server: BackgroundServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Outputs longer than the model's context: every request is a 400, and the run says so."""
    out = tmp_path / "serve.json"
    code = _bench(
        "--api", "openai", "--server", tiny_server.http_address,
        "--grpc-server", tiny_server.address, "--num-requests", "3", "--input-len", "8",
        "--output-len", "1000000", "--no-progress", "--json", str(out),
    )
    assert code == 1
    report = json.loads(out.read_text())
    assert report["completed"] == 0 and report["failed"] == 3
    assert report["total_output_tokens"] == 0
    (error,) = report["errors"]
    assert error.startswith("HTTP 400: invalid_request_error:") and "max_tokens" in error
    assert f"error: {error}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--api", "openai", "--server", "127.0.0.1:1"], "needs --grpc-server"),
        (["--grpc-server", "127.0.0.1:1", "--server", "127.0.0.1:2"], "is for --api openai"),
        (["--api", "openai", "--grpc-server", "127.0.0.1:1"], "goes with --server"),
        (["--api", "openai", "--compare-tracing"], "gRPC API only"),
    ],
)
def test_bench_serve_refuses_api_flags_that_do_not_fit(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _bench(*flags) == 2
    assert message in capsys.readouterr().err


def test_bench_serve_api_must_be_grpc_or_openai(capsys: pytest.CaptureFixture[str]) -> None:
    from pagedserve.backend.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["bench", "serve", "--api", "kserve"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'kserve'" in capsys.readouterr().err
    assert build_parser().parse_args(["bench", "serve"]).api == "grpc"


# -- failures a real server does not produce on demand, from a scripted one -------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _chunk(text: str, usage: dict[str, int] | None = None) -> bytes:
    choices = [{"index": 0, "text": text, "finish_reason": None}] if usage is None else []
    return b"data: " + json.dumps({"choices": choices, "usage": usage}).encode() + b"\n\n"


async def _stream(request: web.Request, *pieces: bytes) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for piece in pieces:
        await response.write(piece)
    return response


async def _complete(request: web.Request) -> web.StreamResponse:
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    return await _stream(request, _chunk("a"), _chunk("b"), _chunk("", usage), b"data: [DONE]\n\n")


async def _in_band_error(request: web.Request) -> web.StreamResponse:
    error = {"error": {"message": "shutting down", "type": "server_error"}}
    payload = b"data: " + json.dumps(error).encode() + b"\n\n"
    return await _stream(request, _chunk("a"), payload, b"data: [DONE]\n\n")


async def _no_done(request: web.Request) -> web.StreamResponse:
    usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    return await _stream(request, _chunk("a"), _chunk("", usage))


async def _no_usage(request: web.Request) -> web.StreamResponse:
    return await _stream(request, _chunk("a"), b"data: [DONE]\n\n")


async def _dropped(request: web.Request) -> web.StreamResponse:
    response = await _stream(request, _chunk("a"))
    assert request.transport is not None
    request.transport.abort()  # the connection dies mid-stream
    return response


async def _plain_500(request: web.Request) -> web.Response:
    return web.Response(status=500, text="Internal Server Error")


async def _rate_limited(request: web.Request) -> web.Response:
    error = {"error": {"message": "the queue is full", "type": "rate_limit_error"}}
    return web.json_response(error, status=429)


@pytest.fixture
async def scripted(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A server answering /v1/completions with ``request.param``; yields its host:port."""
    app = web.Application()
    app.router.add_post("/v1/completions", request.param)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def _one(address: str) -> RequestRecord:
    async with OpenAICompletions(CompletionsTarget(address, "m")) as completions:
        return await completions.request([5, 6, 7], 2, True)


@pytest.mark.parametrize("scripted", [_complete], indirect=True)
async def test_a_complete_stream_is_measured(scripted: str) -> None:
    record = await _one(scripted)
    assert record.error is None and record.output_tokens == 2 and record.prompt_tokens == 3
    assert record.ttft is not None and record.latency is not None and len(record.itls) == 1


@pytest.mark.parametrize(
    ("scripted", "error"),
    [
        (_in_band_error, "in-stream error: server_error: shutting down"),
        (_no_done, "stream: ended without data: [DONE]"),
        (_no_usage, "stream: no usage chunk before data: [DONE]"),
        (_dropped, "connection: "),
        (_plain_500, "HTTP 500: Internal Server Error"),
        (_rate_limited, "HTTP 429: rate_limit_error: the queue is full"),
    ],
    indirect=["scripted"],
)
async def test_every_failure_is_a_failed_record(scripted: str, error: str) -> None:
    record = await _one(scripted)
    assert record.error is not None and record.error.startswith(error), record.error
    assert record.latency is None


async def test_a_refused_connection_is_a_failed_record() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        record = await _one(f"127.0.0.1:{port}")
    assert record.error is not None and record.error.startswith("connection: Client"), record


def test_bench_serve_api_openai_in_process(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    code = _bench(
        "--api", "openai", "--model", str(tiny_llama_dir), "--num-blocks", "128",
        "--num-requests", "4", "--input-len", "16", "--output-len", "6", "--no-progress",
        "--json", str(out),
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert report["api"] == "openai" and report["completed"] == 4
    assert report["total_output_tokens"] == 24
