"""A replica drains behind a real proxy: Debian's nginx (``grpc_pass``, ``least_conn``) over two
``pagedserve serve`` replicas of a tiny random model on CPU, all on loopback.

Streams through nginx spread over both replicas; replica A gets SIGTERM while they run. Every
stream still completes with its whole output (the drain lets A's finish), A exits 0, and
requests sent while A drains are answered by B: A's listener is closed, so nginx's connection
fails and ``grpc_next_upstream error`` passes the request on.

Which replica served a request is read from nginx's own access log: the client tags each call
with ``x-stream-id`` metadata, and nginx logs it beside ``$upstream_addr`` (every replica it
tried, the last one answered). Both replicas hold the same model, so one greedy reference per
prompt (taken straight from B) is the expected output whichever replica serves it.
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pagedserve.clients.client import GenerationClient, build_request
from pagedserve.v1 import generation_pb2 as pb
from tests.backend.server.serve_process import (
    NOT_SERVING,
    SERVING,
    HealthWatch,
    StreamReader,
    serving,
)
from tests.deploy.nginx import STREAM_ID_HEADER, Nginx, Route, nginx_binary, running_nginx

# Engine steps paused this long: the streams are surely in flight at the signal, and the
# replicas mostly sleep instead of fighting over a small machine's cores.
STEP_DELAY_S = 0.02
STREAMS = 8
STREAM_TOKENS = 120
NEW_REQUESTS = 4
NEW_TOKENS = 4
DRAIN_TIMEOUT_S = 60.0
# Bounds on every wait: generous for a loaded two-core machine, never unbounded.
CALL_TIMEOUT_S = 120.0
FIRST_MESSAGE_TIMEOUT_S = 60.0
LOG_TIMEOUT_S = 10.0
GREEDY = {"ignore_eos": True, "temperature": 0.0}


@pytest.fixture(scope="module")
def nginx_path() -> Path:
    binary, why = nginx_binary()
    if binary is None:
        pytest.skip(
            "NGINX COULD NOT BE INSTALLED - THE DRAIN-BEHIND-A-PROXY TEST DID NOT RUN: " + why
        )
    return binary


def _tagged(stream_id: str) -> tuple[tuple[str, str], ...]:
    return ((STREAM_ID_HEADER, stream_id),)


def _references(address: str, prompts: list[str], max_tokens: int) -> list[list[int]]:
    """Greedy outputs straight from one replica (both hold the same model)."""
    with GenerationClient(address) as direct, ThreadPoolExecutor(len(prompts)) as pool:
        replies = pool.map(
            lambda p: direct.complete(p, max_tokens=max_tokens, timeout=CALL_TIMEOUT_S, **GREEDY),
            prompts,
        )
        return [list(reply.token_ids) for reply in replies]


def _running(address: str) -> int:
    with GenerationClient(address) as direct:
        return direct.load().num_running


def _wait_for_routes(proxy: Nginx, ids: set[str]) -> dict[str, Route]:
    """nginx logs a request as it ends; wait (bounded) until every id is there."""
    deadline = time.monotonic() + LOG_TIMEOUT_S
    while True:
        routes = proxy.routes()
        if ids <= routes.keys():
            return routes
        if time.monotonic() > deadline:
            raise AssertionError(f"nginx never logged {sorted(ids - routes.keys())}")
        time.sleep(STEP_DELAY_S)


def test_sigterm_on_one_replica_behind_nginx_loses_no_stream(
    nginx_path: Path, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    prompts = {f"stream-{i}": f"Request {i} through the proxy says" for i in range(STREAMS)}
    new_prompts = {f"new-{i}": f"Late request {i} asks" for i in range(NEW_REQUESTS)}
    with serving(
        [tiny_llama_dir, tiny_llama_dir], tmp_path,
        step_delay_s=STEP_DELAY_S, drain_timeout_s=DRAIN_TIMEOUT_S,
    ) as (a, b):
        expected = dict(zip(prompts, _references(b.address, list(prompts.values()), STREAM_TOKENS)))
        expected_new = dict(
            zip(new_prompts, _references(b.address, list(new_prompts.values()), NEW_TOKENS))
        )
        (tmp_path / "nginx").mkdir()
        with (
            running_nginx(nginx_path, tmp_path / "nginx", [a.address, b.address]) as proxy,
            GenerationClient(proxy.address) as client,
            HealthWatch(a.address) as a_health,
        ):
            a_health.wait_for(SERVING)
            streams = {
                stream_id: StreamReader(
                    client.stub.Generate(
                        build_request(prompt, max_tokens=STREAM_TOKENS, **GREEDY),
                        metadata=_tagged(stream_id),
                        timeout=CALL_TIMEOUT_S,
                    )
                )
                for stream_id, prompt in prompts.items()
            }
            for stream in streams.values():
                stream.wait_first_message(FIRST_MESSAGE_TIMEOUT_S)
            running_on_a, running_on_b = _running(a.address), _running(b.address)
            tokens_at_signal = {sid: len(s.token_ids) for sid, s in streams.items()}
            a.process.send_signal(signal.SIGTERM)

            # A drains: NOT_SERVING, listener closed, its streams still running.
            a_health.wait_for(NOT_SERVING)
            with ThreadPoolExecutor(NEW_REQUESTS) as pool:
                late = dict(
                    zip(
                        new_prompts,
                        pool.map(
                            lambda item: client.stub.Complete(
                                build_request(item[1], max_tokens=NEW_TOKENS, **GREEDY),
                                metadata=_tagged(item[0]),
                                timeout=CALL_TIMEOUT_S,
                            ),
                            new_prompts.items(),
                        ),
                    )
                )
            a_drained_after_late_requests = not a.running()
            for stream in streams.values():
                stream.join(CALL_TIMEOUT_S)
            a_exit = a.wait_exit(CALL_TIMEOUT_S)
            routes = _wait_for_routes(proxy, set(prompts) | set(new_prompts))
            b_still_serving = b.running()

    # The load was spread, and A was in the middle of its streams when the signal came.
    assert running_on_a >= 1 and running_on_b >= 1, (running_on_a, running_on_b)
    assert running_on_a + running_on_b == STREAMS
    served_by = {sid: routes[sid].upstreams[-1] for sid in prompts}
    on_a = [sid for sid in prompts if served_by[sid] == a.address]
    on_b = [sid for sid in prompts if served_by[sid] == b.address]
    assert (len(on_a), len(on_b)) == (running_on_a, running_on_b), served_by
    assert all(tokens_at_signal[sid] < STREAM_TOKENS for sid in on_a), tokens_at_signal

    # No stream lost or cut: each has its full greedy output and a clean finish.
    for stream_id, stream in streams.items():
        assert stream.error is None, (stream_id, stream.error)
        assert stream.final.finish_reason == pb.FINISH_REASON_LENGTH, stream_id
        assert stream.final.usage.completion_tokens == STREAM_TOKENS, stream_id
        assert stream.token_ids == expected[stream_id], stream_id
        assert routes[stream_id].status == 200
        assert routes[stream_id].upstreams == (served_by[stream_id],), routes[stream_id]

    # Requests sent during A's drain were answered by B, each in full.
    assert not a_drained_after_late_requests, "A was no longer draining when they were answered"
    for stream_id, reply in late.items():
        assert reply.finish_reason == pb.FINISH_REASON_LENGTH, stream_id
        assert list(reply.token_ids) == expected_new[stream_id], stream_id
        assert routes[stream_id].upstreams[-1] == b.address, routes[stream_id]
        assert routes[stream_id].status == 200

    assert a_exit == 0, a.log_text()
    assert b_still_serving
