"""Chaos and soak: a real ``pagedserve serve`` process on loopback under a mixed, hostile load.

Round 1 sends ``SOAK_REQUESTS`` requests (300) at ``SOAK_CONCURRENCY`` (32) streams at once:
random prompt and output lengths (enough together to make the KV cache preempt), native
streams and unary calls, chat, KServe unary and streaming, 10% client cancels mid-stream, 5%
deadlines that expire mid-generation, 10% bad requests. Every outcome must be the one its kind
expects (a table by kind and outcome is printed); afterwards the KV blocks are back to their
baseline and the server's resident memory grew less than ``RSS_GROWTH_BOUND_MIB``. Then the
server drains: streams in flight when SIGTERM lands finish whole, a new call is refused, the
exit code is 0.

Round 2 runs the engine in its own process, opens streams, SIGKILLs the engine mid-stream and
checks that every open stream fails with UNAVAILABLE within ``STREAMS_FAIL_WITHIN_S`` and that
the server exits with 1 within ``SERVER_EXITS_WITHIN_S`` (its orchestrator then starts a fresh
one).

Longer: ``PAGEDSERVE_SOAK_REQUESTS=5000`` (and ``PAGEDSERVE_SOAK_CONCURRENCY``,
``PAGEDSERVE_SOAK_SEED`` for another mix); the memory bound is the same at every size, since
a leak grows with the requests and a warm server's caches do not.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from pagedserve.backend.server import kserve_protocol as kp
from pagedserve.v1 import generation_pb2 as pb
from pagedserve.v1 import generation_pb2_grpc as pb_grpc
from tests.backend.server.serve_process import ServeProcess, launch

SOAK_REQUESTS = int(os.environ.get("PAGEDSERVE_SOAK_REQUESTS", "300"))
SOAK_CONCURRENCY = int(os.environ.get("PAGEDSERVE_SOAK_CONCURRENCY", "32"))
SOAK_SEED = int(os.environ.get("PAGEDSERVE_SOAK_SEED", "20240611"))
# Requests of the same mix before the baseline: the first batches of each size and the first
# preemptions allocate what a warm server keeps (allocator arenas, gRPC buffers, caches).
WARMUP_REQUESTS = 64
# Resident memory of the server process after the round, over its baseline after the warm-up.
# It grows while native caches keyed by the steps' shapes fill (oneDNN's primitive cache,
# allocator arenas; the Python heap stays flat under tracemalloc, and the same load repeated
# adds nothing) up to a plateau near 1 GiB, which a run reaches after some 1500 requests.
# Measured on a two-core CPU machine: +170-190 MiB after 300 requests, +433 MiB after 3000
# (peak 1035 MiB). The bound holds at every size; at the longer setting it catches a leak
# of 40 KiB a request (5000 requests), at the CI size only a gross one.
RSS_GROWTH_BOUND_MIB = 640.0
VOCAB = 49152  # the tiny model's vocabulary
# A quarter of TINY_ENGINE's cache (64 blocks of 16 tokens for 32 streams, some of ~450 tokens):
# the long requests of the mix, when they meet, make the scheduler preempt.
SOAK_ENGINE_FLAGS = ("--num-blocks=64",)
METRICS = re.compile(r"metrics on (http://[\d.]+:\d+\S*)")
# Long enough to still run when a cancel or a deadline lands: a token takes milliseconds.
LONG_OUTPUT = 300
CALL_TIMEOUT_S = 120.0  # a call open this long has hung: it fails the round
FREE_TIMEOUT_S = 10.0
DRAIN_TIMEOUT_S = 30.0  # the server's --drain-timeout: the drain must end well before it
DRAIN_STREAMS = 8
DRAIN_OUTPUT = 200
# Round 2's bounds. The engine's death reaches the streams through its socket at once (tens
# of milliseconds); the server notices within its engine check interval (1 s), drains what is
# left (nothing) and exits. Both bounds leave room for a busy two-core machine.
KILL_STREAMS = 6
STREAMS_FAIL_WITHIN_S = 5.0
SERVER_EXITS_WITHIN_S = 20.0

Code = grpc.StatusCode
MODEL = "tiny-llama"  # the served model name: the model directory's name
KSERVE_INFER = "/inference.GRPCInferenceService/ModelInfer"
KSERVE_STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
WORDS = ("the cat sat on a mat while rain fell over old town roofs and bright lamps glowed "
         "near quiet streets").split()

# Request kinds, their share of the mix, and the outcomes each may end with.
MIX: dict[str, float] = {
    "stream": 0.30,
    "complete": 0.20,
    "chat": 0.05,
    "kserve": 0.10,
    "kserve_stream": 0.10,
    "cancel": 0.10,
    "deadline": 0.05,
    "bad": 0.10,
}
EXPECTED: dict[str, set[str]] = {
    "stream": {"OK"},
    "complete": {"OK"},
    "chat": {"OK"},
    "kserve": {"OK"},
    "kserve_stream": {"OK"},
    "cancel": {"CANCELLED"},
    "deadline": {"DEADLINE_EXCEEDED"},
    "bad": {"INVALID_ARGUMENT", "NOT_FOUND"},
}


# ---- the server process -------------------------------------------------------------------------


@pytest.fixture
def serve(tiny_llama_dir: Path, tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """Starts ``pagedserve serve`` processes (SERVING when returned); kills them at the end."""
    started: list[ServeProcess] = []

    def start(*flags: str) -> ServeProcess:
        process = launch(
            tiny_llama_dir, tmp_path / f"serve-{len(started)}.log", step_delay_s=0.0,
            drain_timeout_s=DRAIN_TIMEOUT_S, extra_flags=[*SOAK_ENGINE_FLAGS, *flags],
        )
        started.append(process)
        process.wait_listening()
        process.wait_serving()
        return process

    try:
        yield start
    finally:
        for process in started:
            process.kill()


class RssSampler:
    """The server process's resident memory, sampled on a thread (for the peak)."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self._process = psutil.Process(pid)
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)
        self._thread.start()

    def now(self) -> int:
        return int(self._process.memory_info().rss)

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.peak = max(self.peak, self.now())
            except psutil.Error:
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def mib(n: int) -> float:
    return n / 2**20


def preemptions(server: ServeProcess) -> int:
    """The server's count of preempted requests, from its metrics endpoint."""
    match = METRICS.search(server.log_text())
    assert match, "the server did not log its metrics address"
    with urllib.request.urlopen(match.group(1), timeout=10) as reply:
        text = reply.read().decode()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith("pagedserve_num_preemptions_total"))


# ---- the requests -------------------------------------------------------------------------------


@dataclass
class Planned:
    """One request of the mix: its kind and how to send it."""

    kind: str
    index: int
    params: dict[str, Any] = field(default_factory=dict)


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _length(rng: random.Random, short: int, long: int) -> int:
    """Mostly up to ``short``; a quarter of the time up to ``long``."""
    return rng.randint(1, short) if rng.random() < 0.75 else rng.randint(short + 1, long)


def _sampling(rng: random.Random) -> dict[str, Any]:
    """Random output length and sampling."""
    params: dict[str, Any] = {"max_tokens": _length(rng, 12, 48),
                              "ignore_eos": rng.random() < 0.5}
    if rng.random() < 0.5:
        params["temperature"] = 0.0
    else:
        params.update(temperature=rng.uniform(0.3, 1.5), top_p=rng.uniform(0.5, 1.0),
                      seed=rng.randrange(2**31))
    if rng.random() < 0.2:
        params["top_k"] = rng.randint(1, 50)
    if rng.random() < 0.1:
        params["stop"] = [rng.choice(WORDS)]
    if rng.random() < 0.1:
        params["logprobs"] = rng.randint(0, 5)
    return params


# Bad requests: (request fields, or raw bytes to Complete, or a KServe request), and the code.
def _bad_requests() -> list[tuple[str, Any, str]]:
    text_only = kp.ModelInferRequest(model_name=MODEL)
    tensor = text_only.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(b'{"max_tokens": 2}')
    unknown = kp.ModelInferRequest(model_name="no-such-model")
    return [
        ("native", dict(prompt="hi", temperature=-1.0, max_tokens=2), "INVALID_ARGUMENT"),
        ("native", dict(prompt="", max_tokens=2), "INVALID_ARGUMENT"),
        ("native", dict(prompt="\x04\x06", max_tokens=2), "INVALID_ARGUMENT"),
        ("native", dict(prompt="hi", top_k=0, max_tokens=2), "INVALID_ARGUMENT"),
        ("native", dict(prompt="hi", max_tokens=5000), "INVALID_ARGUMENT"),
        ("native", dict(prompt="hi", model="no-such-model", max_tokens=2), "NOT_FOUND"),
        ("ids", [5, VOCAB + 5], "INVALID_ARGUMENT"),
        ("raw", b"\x1a\x50ab", "INVALID_ARGUMENT"),
        ("kserve", text_only, "INVALID_ARGUMENT"),
        ("kserve", unknown, "NOT_FOUND"),
    ]


BAD = _bad_requests()


def plan(count: int, seed: int) -> list[Planned]:
    """``count`` requests drawn from MIX, each with its random parameters."""
    rng = random.Random(seed)
    kinds = list(MIX)
    weights = [MIX[k] for k in kinds]
    planned = []
    for index in range(count):
        kind = rng.choices(kinds, weights)[0]
        params = _sampling(rng)
        params["prompt"] = _text(rng, _length(rng, 24, 120))
        if kind == "cancel":
            params.update(max_tokens=LONG_OUTPUT, ignore_eos=True, cancel_after=rng.randint(1, 3))
        elif kind == "deadline":
            params.update(max_tokens=LONG_OUTPUT, ignore_eos=True,
                          timeout=rng.uniform(0.05, 0.4), stream=rng.random() < 0.5)
        elif kind == "bad":
            params["bad"] = rng.randrange(len(BAD))
        planned.append(Planned(kind, index, params))
    return planned


def _native_request(params: dict[str, Any], request_id: str) -> pb.GenerateRequest:
    fields = {k: v for k, v in params.items() if k in pb.GenerateRequest.DESCRIPTOR.fields_by_name}
    stop = fields.pop("stop", [])
    request = pb.GenerateRequest(request_id=request_id, **fields)
    request.stop.extend(stop)
    return request


def _kserve_request(params: dict[str, Any], request_id: str, stream: bool) -> Any:
    request = kp.ModelInferRequest(model_name=MODEL, id=request_id)
    inputs = {"text_input": params["prompt"].encode(), "stream": stream,
              "exclude_input_in_output": True, "return_num_output_tokens": True}
    for name, value in inputs.items():
        tensor = request.inputs.add(name=name, shape=[1])
        if isinstance(value, bytes):
            tensor.datatype = "BYTES"
            tensor.contents.bytes_contents.append(value)
        else:
            tensor.datatype = "BOOL"
            tensor.contents.bool_contents.append(value)
    for key in ("max_tokens", "temperature", "top_p", "seed", "top_k", "ignore_eos"):
        if key in params:
            value = params[key]
            parameter = request.parameters[key]
            if isinstance(value, bool):
                parameter.bool_param = value
            elif isinstance(value, int):
                parameter.int64_param = value
            else:
                parameter.double_param = value
    return request


def _num_output_tokens(response: Any) -> int:
    names = [o.name for o in response.outputs]
    raw = response.raw_output_contents[names.index("num_output_tokens")]
    return int.from_bytes(raw[:4], "little")


class Load:
    """The round's requests, sent over one channel by SOAK_CONCURRENCY workers."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = pb_grpc.GenerationServiceStub(self.channel)
        self.complete_raw = self.channel.unary_unary(
            "/pagedserve.v1.GenerationService/Complete"
        )
        self.kserve_infer = self.channel.unary_unary(
            KSERVE_INFER, request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=kp.ModelInferResponse.FromString,
        )
        self.kserve_stream = self.channel.stream_stream(
            KSERVE_STREAM, request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=kp.ModelStreamInferResponse.FromString,
        )

    async def close(self) -> None:
        await self.channel.close()

    async def run(self, planned: list[Planned], concurrency: int) -> list[tuple[str, str, str]]:
        """(kind, outcome, what was wrong if anything) for every planned request."""
        queue: asyncio.Queue[Planned] = asyncio.Queue()
        for p in planned:
            queue.put_nowait(p)
        results: list[tuple[str, str, str]] = []

        async def worker() -> None:
            while not queue.empty():
                p = queue.get_nowait()
                try:
                    outcome, problem = await asyncio.wait_for(self.one(p), CALL_TIMEOUT_S)
                except grpc.aio.AioRpcError as error:
                    outcome, problem = error.code().name, ""
                    if outcome not in EXPECTED[p.kind]:
                        problem = (error.details() or "")[:200]
                except asyncio.TimeoutError:
                    outcome, problem = "HUNG", f"open after {CALL_TIMEOUT_S} s"
                results.append((p.kind, outcome, problem))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results

    async def one(self, p: Planned) -> tuple[str, str]:
        """Send one request; its outcome ("OK" or a code name) and, if its answer was wrong,
        what was wrong."""
        request_id = f"soak-{p.index}"
        params = p.params
        if p.kind in ("stream", "chat", "cancel"):
            request = _native_request(params, request_id)
            if p.kind == "chat":
                request.messages.messages.add(role="user", content=params["prompt"])
            call = self.stub.Generate(request)
            tokens: list[int] = []
            final = None
            async for message in call:
                tokens.extend(message.token_ids)
                final = message
                if p.kind == "cancel" and len(tokens) >= params["cancel_after"]:
                    call.cancel()
                    break
            if p.kind == "cancel":
                # The cancel is the client's; the stream then ends without a status.
                return ("CANCELLED", "") if final is not None else ("OK", "stream ended early")
            assert final is not None
            return "OK", _check_tokens(params, tokens, final)
        if p.kind == "complete":
            reply = await self.stub.Complete(_native_request(params, request_id))
            return "OK", _check_tokens(params, list(reply.token_ids), reply)
        if p.kind == "deadline":
            request = _native_request(params, request_id)
            if params["stream"]:
                async for _ in self.stub.Generate(request, timeout=params["timeout"]):
                    pass
            else:
                await self.stub.Complete(request, timeout=params["timeout"])
            return "OK", "finished before its deadline"
        if p.kind == "kserve":
            response = await self.kserve_infer(_kserve_request(params, request_id, False))
            n = _num_output_tokens(response)
            return "OK", "" if 1 <= n <= params["max_tokens"] else f"{n} tokens"
        if p.kind == "kserve_stream":
            return await self._kserve_stream(params, request_id)
        return await self._bad(params["bad"], request_id)

    async def _kserve_stream(self, params: dict[str, Any], request_id: str) -> tuple[str, str]:
        tokens = 0
        finals = 0
        async for response in self.kserve_stream(
            iter([_kserve_request(params, request_id, True)])
        ):
            if response.error_message:
                return "OK", f"in-band error: {response.error_message[:200]}"
            infer = response.infer_response
            tokens += _num_output_tokens(infer)
            finals += infer.parameters["triton_final_response"].bool_param
        wrong = finals != 1 or not 1 <= tokens <= params["max_tokens"]
        return "OK", f"{finals} final responses, {tokens} tokens" if wrong else ""

    async def _bad(self, which: int, request_id: str) -> tuple[str, str]:
        form, body, code = BAD[which]
        call: Awaitable[Any]
        if form == "native":
            call = self.stub.Complete(pb.GenerateRequest(request_id=request_id, **body))
        elif form == "ids":
            request = pb.GenerateRequest(request_id=request_id, max_tokens=2)
            request.prompt_token_ids.ids.extend(body)
            call = self.stub.Complete(request)
        elif form == "raw":
            call = self.complete_raw(body)
        else:
            call = self.kserve_infer(body)
        try:
            await call
        except grpc.aio.AioRpcError as error:
            name = error.code().name
            return name, "" if name == code else f"expected {code}: {error.details()}"
        return "OK", f"expected {code}"


def _check_tokens(params: dict[str, Any], tokens: list[int], final: pb.GenerateResponse) -> str:
    """What is wrong with a finished generation's tokens, or ""."""
    if final.usage.completion_tokens != len(tokens):
        return f"usage says {final.usage.completion_tokens} tokens, {len(tokens)} came"
    if not 1 <= len(tokens) <= params["max_tokens"]:
        return f"{len(tokens)} tokens for max_tokens {params['max_tokens']}"
    if params["ignore_eos"] and not params.get("stop") and len(tokens) != params["max_tokens"]:
        return f"{len(tokens)} tokens, ignore_eos and max_tokens {params['max_tokens']}"
    if final.finish_reason not in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH):
        return f"finish_reason {final.finish_reason}"
    return ""


def table(results: list[tuple[str, str, str]]) -> str:
    """Outcomes by kind, each marked expected or not."""
    counts = Counter((kind, outcome, bool(problem) or outcome not in EXPECTED[kind])
                     for kind, outcome, problem in results)
    lines = [f"{'kind':14} {'outcome':20} {'count':>6}  "]
    for (kind, outcome, wrong), n in sorted(counts.items()):
        lines.append(f"{kind:14} {outcome:20} {n:6}  {'UNEXPECTED' if wrong else ''}")
    lines.append(f"{'total':35} {len(results):6}")
    return "\n".join(lines)


async def free_blocks(stub: Any) -> tuple[int, int]:
    """(free, total) KV blocks once the engine holds no request (bounded wait)."""
    deadline = time.monotonic() + FREE_TIMEOUT_S
    while True:
        load = await stub.GetLoad(pb.GetLoadRequest())
        idle = load.num_running == 0 and load.num_waiting == 0
        if (idle and load.num_free_blocks == load.num_total_blocks) or time.monotonic() > deadline:
            return load.num_free_blocks, load.num_total_blocks
        await asyncio.sleep(0.05)


# ---- round 1: the soak, then a drain ------------------------------------------------------------


async def test_soak_mixed_load_then_drain(serve: Callable[..., ServeProcess]) -> None:
    server = serve()
    load = Load(server.address)
    try:
        warmup = await load.run(plan(WARMUP_REQUESTS, SOAK_SEED + 1), SOAK_CONCURRENCY)
        assert len(warmup) == WARMUP_REQUESTS
        free_before, total = await free_blocks(load.stub)
        sampler = RssSampler(server.pid)
        rss_before = sampler.now()
        preempted_before = preemptions(server)

        started = time.monotonic()
        results = await load.run(plan(SOAK_REQUESTS, SOAK_SEED), SOAK_CONCURRENCY)
        elapsed = time.monotonic() - started

        free_after, _ = await free_blocks(load.stub)
        rss_after = sampler.now()
        sampler.stop()
        growth = mib(rss_after - rss_before)
        report = (
            f"\n{SOAK_REQUESTS} requests at concurrency {SOAK_CONCURRENCY} in {elapsed:.1f} s, "
            f"{preemptions(server) - preempted_before} preemptions\n"
            f"{table(results)}\n"
            f"KV blocks free: {free_before}/{total} before, {free_after}/{total} after\n"
            f"server RSS: {mib(rss_before):.1f} MiB before, {mib(sampler.peak):.1f} MiB peak, "
            f"{mib(rss_after):.1f} MiB after (+{growth:.1f} MiB, bound "
            f"{RSS_GROWTH_BOUND_MIB:.0f} MiB)"
        )
        print(report)
        unexpected = [r for r in results if r[2] or r[1] not in EXPECTED[r[0]]]
        assert len(results) == SOAK_REQUESTS
        assert not unexpected, f"{report}\nfirst unexpected: {unexpected[:5]}"
        assert {kind for kind, _, _ in results} == set(MIX), "every kind ran"
        assert free_before == total and free_after == total, report
        assert growth < RSS_GROWTH_BOUND_MIB, report

        await drain_with_streams_in_flight(server, load)
    finally:
        await load.close()


@dataclass
class Read:
    """How one Generate stream ended: its code, details, tokens, last message and when."""

    code: grpc.StatusCode
    details: str
    tokens: list[int]
    final: pb.GenerateResponse | None
    ended_at: float


class StreamReader:
    """Reads one Generate stream to its end in a task; ``first`` is set at its first token."""

    def __init__(self, call: Any) -> None:
        self.first = asyncio.Event()
        self.task = asyncio.ensure_future(self._read(call))

    async def _read(self, call: Any) -> Read:
        tokens: list[int] = []
        final = None
        try:
            async for message in call:
                tokens.extend(message.token_ids)
                final = message
                if tokens:
                    self.first.set()
        except grpc.aio.AioRpcError as error:
            return Read(error.code(), error.details() or "", tokens, final, time.monotonic())
        return Read(Code.OK, "", tokens, final, time.monotonic())


async def all_started(readers: list[StreamReader]) -> None:
    await asyncio.wait_for(asyncio.gather(*(r.first.wait() for r in readers)), CALL_TIMEOUT_S)


async def drain_with_streams_in_flight(server: ServeProcess, load: Load) -> None:
    """SIGTERM with DRAIN_STREAMS streams running: each finishes whole, a new call is refused,
    the process exits 0."""
    readers = [
        StreamReader(load.stub.Generate(pb.GenerateRequest(
            prompt=f"Drain {i}", max_tokens=DRAIN_OUTPUT, ignore_eos=True, temperature=0.0,
        )))
        for i in range(DRAIN_STREAMS)
    ]
    await all_started(readers)  # each is in flight when the signal lands
    signalled = time.monotonic()
    os.kill(server.pid, signal.SIGTERM)
    # Refused from the moment the drain starts: a new channel cannot connect (the listener is
    # closed), which the client reports as UNAVAILABLE.
    await asyncio.sleep(0.2)
    async with grpc.aio.insecure_channel(server.address) as late:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.GenerationServiceStub(late).Complete(
                pb.GenerateRequest(prompt="late", max_tokens=2), timeout=10
            )
        assert info.value.code() == Code.UNAVAILABLE, info.value.details()
    reads = await asyncio.wait_for(
        asyncio.gather(*(r.task for r in readers)), DRAIN_TIMEOUT_S
    )
    for read in reads:
        assert read.code == Code.OK, read.details
        assert read.final is not None and read.final.finish_reason == pb.FINISH_REASON_LENGTH
        assert len(read.tokens) == read.final.usage.completion_tokens == DRAIN_OUTPUT
        assert read.ended_at > signalled  # it was still running when the drain began
    assert await asyncio.to_thread(server.wait_exit, DRAIN_TIMEOUT_S) == 0, server.log_text()


# ---- round 2: the engine process killed mid-stream ----------------------------------------------


def _engine_process(server: ServeProcess) -> psutil.Process:
    (engine,) = [
        p for p in psutil.Process(server.pid).children(recursive=True)
        if "pagedserve.backend.engine.core" in " ".join(p.cmdline())
    ]
    return engine


async def test_a_killed_engine_process_fails_every_open_stream_and_ends_the_server(
    serve: Callable[..., ServeProcess],
) -> None:
    server = serve("--engine-process")
    engine = _engine_process(server)
    load = Load(server.address)
    try:
        readers = [
            StreamReader(load.stub.Generate(pb.GenerateRequest(
                prompt=f"Keep going {i}", max_tokens=900, ignore_eos=True,
            )))
            for i in range(KILL_STREAMS)
        ]
        kserve = [
            _kserve_request({"prompt": f"And on {i}", "max_tokens": 900, "ignore_eos": True},
                            f"k{i}", True)
            for i in range(2)
        ]
        kserve_reader = asyncio.ensure_future(_read_kserve_stream(load, kserve))
        await all_started(readers)
        await asyncio.sleep(0.2)  # the KServe requests are running too

        killed = time.monotonic()
        engine.send_signal(signal.SIGKILL)
        reads = await asyncio.wait_for(
            asyncio.gather(*(r.task for r in readers)), SERVER_EXITS_WITHIN_S
        )
        in_band = await asyncio.wait_for(kserve_reader, SERVER_EXITS_WITHIN_S)
        for read in reads:
            assert read.code == Code.UNAVAILABLE, (read.code, read.details)
            assert "exited unexpectedly" in read.details, read.details
            assert read.ended_at - killed < STREAMS_FAIL_WITHIN_S, read.ended_at - killed
        # KServe streams answer each request's failure in-band, with the same reason.
        assert sorted(in_band) == ["k0", "k1"], in_band
        for message, at in in_band.values():
            assert "exited unexpectedly" in message, message
            assert at - killed < STREAMS_FAIL_WITHIN_S
        exit_code = await asyncio.to_thread(server.wait_exit, SERVER_EXITS_WITHIN_S)
        exited = time.monotonic() - killed
        print(f"\nengine killed: {len(reads)} streams UNAVAILABLE after at most "
              f"{max(r.ended_at for r in reads) - killed:.2f} s; server exit {exit_code} "
              f"after {exited:.1f} s")
        assert exit_code == 1, server.log_text()
        assert exited < SERVER_EXITS_WITHIN_S
        last = server.log_text().strip().splitlines()[-1]
        assert "the engine has stopped" in last and "exited unexpectedly" in last, last
    finally:
        await load.close()


async def _read_kserve_stream(load: Load, requests: list[Any]) -> dict[str, tuple[str, float]]:
    """Each request's in-band error on one ModelStreamInfer stream, and when it came."""
    errors: dict[str, tuple[str, float]] = {}
    try:
        async for response in load.kserve_stream(iter(requests)):
            if response.error_message:
                errors[response.infer_response.id] = (response.error_message, time.monotonic())
    except grpc.aio.AioRpcError as error:  # the server went away: the in-band errors came first
        if error.code() != Code.UNAVAILABLE:
            raise
    return errors
