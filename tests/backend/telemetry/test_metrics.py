"""The Prometheus endpoint of a real server, scraped over HTTP and parsed with
prometheus_client's parser, against the requests the test sent."""

from __future__ import annotations

import re
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pagedserve.backend.config import EngineConfig, ServerConfig, TelemetryConfig
from pagedserve.backend.server.server import BackgroundServer
from pagedserve.backend.telemetry.metrics import WAITING_GAUGE
from pagedserve.clients.client import GenerationClient
from tests.backend.server.harness import (
    TINY_ENGINE,
    SlowSteps,
    all_blocks_free,
    running_server,
    wait_for,
)

REPO = Path(__file__).resolve().parents[3]
SCRAPE_TIMEOUT_S = 5.0
WAIT_S = 10.0

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(server: BackgroundServer) -> Samples:
    """Every sample, by name and sorted labels, after the telemetry thread caught up."""
    telemetry = server.state.telemetry
    assert telemetry.flush(WAIT_S)
    url = f"http://127.0.0.1:{telemetry.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
        assert response.status == 200
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: Samples, name: str, model: str, **labels: str) -> float:
    key = (name, tuple(sorted({"model_name": model, **labels}.items())))
    assert key in samples, f"{key} not exposed"
    return samples[key]


def diff(after: Samples, before: Samples, name: str, model: str, **labels: str) -> float:
    return value(after, name, model, **labels) - value(before, name, model, **labels)


def running_and_waiting(client: GenerationClient) -> bool:
    load = client.load()
    return load.num_running >= 1 and load.num_waiting >= 1


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path) -> Iterator[BackgroundServer]:
    with running_server(tiny_llama_dir) as s:
        yield s


def test_counters_and_histograms_match_the_requests_sent(server: BackgroundServer) -> None:
    model = server.state.served_model_name
    before = scrape(server)
    prompts = [[100 + i] * (5 + i) for i in range(4)]
    max_tokens = [3, 4, 5, 6]
    slow = SlowSteps(server, 0.02)
    with GenerationClient(server.address) as client:
        for prompt, n in zip(prompts, max_tokens):
            response = client.complete(prompt_token_ids=prompt, max_tokens=n, ignore_eos=True)
            assert response.usage.completion_tokens == n
        with slow.on():  # a request cancelled after its first tokens
            call = client.generate(prompt_token_ids=[7] * 9, max_tokens=300, ignore_eos=True)
            stream = iter(call)
            next(stream), next(stream)
            call.cancel()
            wait_for(lambda: all_blocks_free(client), WAIT_S, "blocks after cancel")
    after = scrape(server)

    finished = "pagedserve_requests_finished_total"
    assert diff(after, before, finished, model, finish_reason="length") == len(prompts)
    assert diff(after, before, finished, model, finish_reason="abort") == 1
    assert diff(after, before, finished, model, finish_reason="stop") == 0
    assert diff(after, before, finished, model, finish_reason="error") == 0
    assert diff(after, before, "pagedserve_prompt_tokens_total", model) == (
        sum(map(len, prompts)) + 9
    )
    generated = diff(after, before, "pagedserve_generation_tokens_total", model)
    assert generated >= sum(max_tokens) + 2
    requests = len(prompts) + 1
    for histogram in (
        "pagedserve_e2e_request_latency_seconds",
        "pagedserve_request_queue_time_seconds",
        "pagedserve_time_to_first_token_seconds",
    ):
        assert diff(after, before, f"{histogram}_count", model) == requests, histogram
        assert diff(after, before, f"{histogram}_sum", model) > 0
    # Every request's tokens but its first are one inter-token gap each.
    itl = diff(after, before, "pagedserve_inter_token_latency_seconds_count", model)
    assert itl == generated - requests
    # Buckets are cumulative and end at the count.
    inf = value(after, "pagedserve_inter_token_latency_seconds_bucket", model, le="+Inf")
    assert inf == value(after, "pagedserve_inter_token_latency_seconds_count", model)
    # The prefix cache saw every prompt token of every request (4 + 1 new prompts).
    queries = diff(after, before, "pagedserve_prefix_cache_queries_total", model)
    assert queries == sum(map(len, prompts)) + 9
    assert value(after, "pagedserve_num_requests_running", model) == 0
    assert value(after, WAITING_GAUGE, model) == 0
    assert value(after, "pagedserve_kv_cache_usage_ratio", model) == 0


def test_rpcs_are_counted_by_status_refusals_included(server: BackgroundServer) -> None:
    model = server.state.served_model_name

    def count(samples: Samples, method: str, code: str) -> float:
        labels = {"model_name": model, "method": method, "code": code}
        return samples.get(("pagedserve_requests_total", tuple(sorted(labels.items()))), 0.0)

    before = scrape(server)
    with GenerationClient(server.address) as client:
        client.complete("Hello", max_tokens=2)
        list(client.generate("Hello", max_tokens=2))
        for bad in ({"max_tokens": 0}, {"temperature": float("inf")}):
            with pytest.raises(grpc.RpcError) as info:
                client.complete("Hello", **bad)
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError):
            list(client.generate("Hello", max_tokens=0))
    after = scrape(server)
    assert count(after, "Complete", "OK") - count(before, "Complete", "OK") == 1
    assert count(after, "Generate", "OK") - count(before, "Generate", "OK") == 1
    refused = "INVALID_ARGUMENT"
    assert count(after, "Complete", refused) - count(before, "Complete", refused) == 2
    assert count(after, "Generate", refused) - count(before, "Generate", refused) == 1
    # Refusals never reach the engine, so they finish no request there.
    finished = "pagedserve_requests_finished_total"
    assert diff(after, before, finished, model, finish_reason="length") == 2


def test_kserve_and_http_requests_are_counted_alike(server: BackgroundServer) -> None:
    """Every front counts in the same series: KServe RPCs by method and gRPC code, OpenAI
    HTTP requests by route and the gRPC code their HTTP status stands for."""
    import json

    import numpy as np
    import tritonclient.grpc as grpcclient
    from openai import BadRequestError, OpenAI

    model = server.state.served_model_name

    def count(samples: Samples, method: str, code: str) -> float:
        labels = {"model_name": model, "method": method, "code": code}
        return samples.get(("pagedserve_requests_total", tuple(sorted(labels.items()))), 0.0)

    def kserve_inputs(params: dict[str, object]) -> list[grpcclient.InferInput]:
        text = grpcclient.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"Hello"], dtype=np.object_))
        sampling = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
        sampling.set_data_from_numpy(np.array([json.dumps(params).encode()], dtype=np.object_))
        return [text, sampling]

    before = scrape(server)
    with grpcclient.InferenceServerClient(server.address) as triton:
        triton.infer(model, kserve_inputs({"max_tokens": 2}))
        with pytest.raises(grpcclient.InferenceServerException):
            triton.infer(model, kserve_inputs({"max_tokens": 0}))
    openai = OpenAI(base_url=f"http://{server.http_address}/v1", api_key="unused", max_retries=0)
    openai.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    with pytest.raises(BadRequestError):
        openai.completions.create(model=model, prompt="Hi", max_tokens=0)
    openai.close()
    after = scrape(server)

    def delta(method: str, code: str) -> float:
        return count(after, method, code) - count(before, method, code)

    assert delta("ModelInfer", "OK") == 1 and delta("ModelInfer", "INVALID_ARGUMENT") == 1
    assert delta("/v1/chat/completions", "OK") == 1
    assert delta("/v1/completions", "INVALID_ARGUMENT") == 1


def test_http_statuses_map_back_to_the_codes_they_came_from() -> None:
    """The request counter's HTTP-to-gRPC table inverts the OpenAI front's gRPC-to-HTTP one."""
    from pagedserve.backend.server.openai.errors import _HTTP_STATUS
    from pagedserve.backend.telemetry.server_telemetry import grpc_code_of_http_status

    for code, status in _HTTP_STATUS.items():
        assert grpc_code_of_http_status(int(status)) is code
    assert grpc_code_of_http_status(200) is grpc.StatusCode.OK
    assert grpc_code_of_http_status(None) is grpc.StatusCode.CANCELLED
    assert grpc_code_of_http_status(418) is grpc.StatusCode.UNKNOWN


def test_the_process_metrics_are_on_the_same_endpoint(server: BackgroundServer) -> None:
    names = {name for name, _ in scrape(server)}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= names


def test_gauges_follow_the_load(tiny_llama_dir: Path) -> None:
    # One sequence at a time and few blocks: requests wait, and preemption is forced.
    with running_server(
        tiny_llama_dir, block_size=16, num_blocks=12, max_num_seqs=2, max_num_batched_tokens=64
    ) as server, GenerationClient(server.address) as client:
        model = server.state.served_model_name
        slow = SlowSteps(server, 0.02)
        results: list[int] = []

        def run(i: int) -> None:
            response = client.complete(f"Request number {i} " * 4, max_tokens=100, ignore_eos=True)
            results.append(response.usage.completion_tokens)

        with slow.on():
            threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            wait_for(lambda: running_and_waiting(client), WAIT_S, "running and waiting requests")
            busy = scrape(server)
            for t in threads:
                t.join(120)
        assert results == [100] * 4
        assert value(busy, WAITING_GAUGE, model) >= 1
        assert value(busy, "pagedserve_num_requests_running", model) >= 1
        assert 0 < value(busy, "pagedserve_kv_cache_usage_ratio", model) <= 1
        done = scrape(server)
        preemptions = value(done, "pagedserve_num_preemptions_total", model)
        assert preemptions >= 1
        engine = server.state.engine
        assert preemptions == engine.engine.scheduler.num_preemptions
        assert value(done, WAITING_GAUGE, model) == 0


def test_the_metric_names_the_deploy_manifests_use_are_exposed(server: BackgroundServer) -> None:
    used: set[str] = set()
    for path in (REPO / "deploy").rglob("*"):
        if path.is_file() and path.suffix in {".yaml", ".yml", ".md", ".json"}:
            used.update(re.findall(r"\bpagedserve_[a-z_]+\b", path.read_text()))
    assert WAITING_GAUGE in used
    exposed = {name for name, _ in scrape(server)}
    families = {re.sub(r"_(bucket|count|sum|total|created)$", "", n) for n in exposed}
    missing = {n for n in used if n not in exposed and n not in families}
    assert not missing, f"deploy/ refers to metrics the server does not expose: {missing}"


def test_metrics_port_zero_picks_a_free_port_and_a_busy_port_fails_startup(
    tiny_llama_dir: Path,
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = BackgroundServer(
            ServerConfig(
                host="127.0.0.1", port=0, http_port=0,
                telemetry=TelemetryConfig(metrics_port=port, metrics_host="127.0.0.1"),
            ),
            EngineConfig.from_kwargs(model=str(tiny_llama_dir), **TINY_ENGINE),
        )
        with pytest.raises(OSError):
            server.start()
