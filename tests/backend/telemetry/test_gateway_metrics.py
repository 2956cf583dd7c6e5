"""The gauges an inference gateway's endpoint picker scrapes (the Gateway API Inference
Extension's model server protocol), read from a real server's metrics endpoint while requests
are queued and running, with the engine parked so the values can be compared exactly."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from pagedserve.backend.server.server import BackgroundServer
from pagedserve.backend.telemetry.metrics import (
    BLOCK_SIZE_LABEL,
    CACHE_CONFIG_INFO,
    KV_CACHE_USAGE_GAUGE,
    NUM_BLOCKS_LABEL,
    RUNNING_GAUGE,
    WAITING_GAUGE,
)
from pagedserve.clients.client import GenerationClient
from tests.backend.server.harness import SlowSteps, all_blocks_free, running_server, wait_for
from tests.backend.telemetry.test_metrics import Samples, scrape, value

BLOCK_SIZE = 16
NUM_BLOCKS = 40
MAX_NUM_SEQS = 2
NUM_REQUESTS = 5
PROMPT_TOKENS = 20
# Long enough that no request finishes in the moment between seeing the load and parking.
MAX_TOKENS = 30
WAIT_S = 30.0
_PARK_LIMIT_S = 30.0


class StepGate:
    """Parks the engine after a step, so its load snapshot (which the gauges read) holds
    still while the test scrapes; ``parked`` says the engine has stopped."""

    def __init__(self, server: BackgroundServer) -> None:
        self._open = threading.Event()
        self._open.set()
        self.parked = threading.Event()
        engine = server.state.engine
        assert engine is not None
        engine.add_step_listener(self._on_step)

    def _on_step(self, info: Any) -> None:
        if not self._open.is_set():
            self.parked.set()
            # Bounded, so a failing test cannot leave the engine thread stuck.
            self._open.wait(_PARK_LIMIT_S)

    @contextmanager
    def closed(self) -> Iterator[None]:
        self.parked.clear()
        self._open.clear()
        try:
            assert self.parked.wait(WAIT_S), "the engine did not reach the gate"
            yield
        finally:
            self._open.set()


def cache_config(samples: Samples, model: str) -> dict[str, str]:
    """The labels of the one cache-info series, less the model's (its value is 1, as an info
    gauge's is)."""
    series = {labels: v for (name, labels), v in samples.items() if name == CACHE_CONFIG_INFO}
    assert list(series.values()) == [1], series
    labels = dict(next(iter(series)))
    assert labels.pop("model_name") == model
    return labels


def test_gateway_gauges_while_requests_are_queued_and_running(tiny_llama_dir: Path) -> None:
    with running_server(
        tiny_llama_dir, block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS, max_num_seqs=MAX_NUM_SEQS,
        max_num_batched_tokens=64,
    ) as server, GenerationClient(server.address) as client:
        model = server.state.served_model_name
        engine = server.state.engine
        assert engine is not None
        expected_cache = {BLOCK_SIZE_LABEL: str(BLOCK_SIZE), NUM_BLOCKS_LABEL: str(NUM_BLOCKS)}
        assert engine.model_info.block_size == BLOCK_SIZE
        assert engine.get_load().num_total_blocks == NUM_BLOCKS

        idle = scrape(server)
        assert cache_config(idle, model) == expected_cache
        assert value(idle, RUNNING_GAUGE, model) == 0
        assert value(idle, WAITING_GAUGE, model) == 0
        assert value(idle, KV_CACHE_USAGE_GAUGE, model) == 0

        slow = SlowSteps(server, 0.02)
        gate = StepGate(server)
        results: list[int] = []

        def run(i: int) -> None:
            response = client.complete(
                prompt_token_ids=[200 + i] * PROMPT_TOKENS, max_tokens=MAX_TOKENS, ignore_eos=True
            )
            results.append(response.usage.completion_tokens)

        def all_admitted() -> bool:
            load = client.load()
            return load.num_running == MAX_NUM_SEQS and load.num_waiting == NUM_REQUESTS - 2

        threads = [threading.Thread(target=run, args=(i,)) for i in range(NUM_REQUESTS)]
        with slow.on():
            for t in threads:
                t.start()
            wait_for(all_admitted, WAIT_S, "two running and three waiting requests")
            with gate.closed():
                load = engine.get_load()
                busy = scrape(server)
            for t in threads:
                t.join(120)
        assert results == [MAX_TOKENS] * NUM_REQUESTS

        # The batch holds max_num_seqs requests; the rest queue (blocks are plentiful, so
        # nothing was preempted back into the queue).
        assert (load.num_running, load.num_waiting) == (MAX_NUM_SEQS, NUM_REQUESTS - 2)
        assert value(busy, RUNNING_GAUGE, model) == MAX_NUM_SEQS
        assert value(busy, WAITING_GAUGE, model) == NUM_REQUESTS - MAX_NUM_SEQS
        # A 0-1 fraction of the blocks, the running requests' blocks exactly.
        used = load.num_total_blocks - load.num_free_blocks
        assert used >= MAX_NUM_SEQS * -(-PROMPT_TOKENS // BLOCK_SIZE)
        usage = value(busy, KV_CACHE_USAGE_GAUGE, model)
        assert usage == load.kv_cache_usage == pytest.approx(used / NUM_BLOCKS, abs=1e-12)
        # The configuration, not the load: unchanged while blocks are in use.
        assert cache_config(busy, model) == expected_cache

        wait_for(lambda: all_blocks_free(client), WAIT_S, "every block free")
        done = scrape(server)
        assert value(done, RUNNING_GAUGE, model) == 0
        assert value(done, WAITING_GAUGE, model) == 0
        assert value(done, KV_CACHE_USAGE_GAUGE, model) == 0
        assert cache_config(done, model) == expected_cache
