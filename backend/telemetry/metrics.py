"""Prometheus metrics of a serving engine, on a registry of its own.

Latency histograms and token counters are fed by the telemetry thread from the engine's
deltas and step records (``observer.py``); the running/waiting/KV gauges, the cache
configuration and the prefix-cache counters are read from the engine's load snapshot when
Prometheus scrapes, so they cost the hot path nothing. Every series carries the served model's
name in ``model_name``.

Every Generate and Complete RPC is counted by the status its client saw
(``pagedserve_requests_total``), refused ones included: a request rejected at admission never
finishes in the engine, so ``pagedserve_requests_finished_total`` cannot count it. The
registry also carries the process's own series (``process_cpu_seconds_total``,
``process_resident_memory_bytes``, ``process_open_fds``, ...; Linux) under their standard names.

The gauges are also what an inference gateway's endpoint picker scrapes to route requests (the
Gateway API Inference Extension's model server protocol): queued requests, running requests,
KV-cache utilisation as a 0-1 fraction, and a ``cache_config_info``-style gauge whose labels
carry the block size and the number of blocks, for its prefix-cache scorer. The protocol fixes
types and semantics, not names, and the picker is told the names per engine (``engineConfigs``
in its EndpointPickerConfig, deploy/k8s/inference-gateway), so they keep our ``pagedserve_``
prefix: vLLM's ``vllm:`` names would pass this server off as vLLM, and the autoscalers already
read ``pagedserve_num_requests_waiting``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pagedserve.backend.engine.request import FinishReason, RequestOutputDelta

if TYPE_CHECKING:
    from pagedserve.backend.engine.messages import LoadInfo, ModelInfo, StepInfo

PREFIX = "pagedserve"
MODEL_LABEL = "model_name"
REASON_LABEL = "finish_reason"
METHOD_LABEL = "method"
CODE_LABEL = "code"
# Autoscalers (deploy/k8s KEDA and HPA, deploy/kserve) and the endpoint picker
# (deploy/k8s/inference-gateway) query these names: keep them.
WAITING_GAUGE = f"{PREFIX}_num_requests_waiting"
RUNNING_GAUGE = f"{PREFIX}_num_requests_running"
KV_CACHE_USAGE_GAUGE = f"{PREFIX}_kv_cache_usage_ratio"
CACHE_CONFIG_INFO = f"{PREFIX}_cache_config_info"
# The label names vLLM gives its cache_config_info, which the endpoint picker reads by default.
# "gpu" is the picker's word for the accelerator's KV cache; on a CPU server it counts the
# blocks of the cache in host memory.
BLOCK_SIZE_LABEL = "block_size"
NUM_BLOCKS_LABEL = "num_gpu_blocks"

# Bucket bounds in seconds: decode steps are milliseconds on a GPU and tenths on a CPU;
# queueing and whole requests reach minutes under load.
TTFT_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0,
)
ITL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
)
REQUEST_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0,
)

LoadSource = Callable[[], "LoadInfo"]


class _LoadCollector(Collector):
    """Gauges and cache counters straight from the engine's load snapshot, at scrape time."""

    def __init__(self) -> None:
        self.model_name = ""
        self.block_size = 0
        self.load: LoadSource | None = None

    def collect(self) -> Iterable[Metric]:
        if self.load is None:
            return []
        load = self.load()
        labels = [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=[MODEL_LABEL])
            family.add_metric(labels, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=[MODEL_LABEL])
            family.add_metric(labels, value)
            return family

        # An info-style gauge: always 1, the configuration is in its labels (vLLM's shape).
        cache_config = GaugeMetricFamily(
            CACHE_CONFIG_INFO, "KV-cache configuration: tokens per block and number of blocks.",
            labels=[MODEL_LABEL, BLOCK_SIZE_LABEL, NUM_BLOCKS_LABEL],
        )
        cache_config.add_metric(
            [self.model_name, str(self.block_size), str(load.num_total_blocks)], 1
        )
        return [
            gauge(RUNNING_GAUGE, "Requests in the running batch.", load.num_running),
            gauge(WAITING_GAUGE, "Requests admitted but not yet scheduled (incl. preempted).",
                  load.num_waiting),
            gauge(KV_CACHE_USAGE_GAUGE, "Fraction of KV-cache blocks in use (0-1).",
                  load.kv_cache_usage),
            cache_config,
            counter(f"{PREFIX}_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                    load.prefix_cache_queries),
            counter(f"{PREFIX}_prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                    load.prefix_cache_hits),
        ]


class ServingMetrics:
    """The metric families, and the telemetry thread's hooks that feed them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = [MODEL_LABEL]
        r = self.registry
        self._ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds", "Arrival to first output token.",
            labels, registry=r, buckets=TTFT_BUCKETS,
        )
        self._itl = Histogram(
            f"{PREFIX}_inter_token_latency_seconds", "Time between two output tokens of a request.",
            labels, registry=r, buckets=ITL_BUCKETS,
        )
        self._e2e = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds", "Arrival to finish (any finish reason).",
            labels, registry=r, buckets=REQUEST_BUCKETS,
        )
        self._queue = Histogram(
            f"{PREFIX}_request_queue_time_seconds", "Arrival to first scheduled.",
            labels, registry=r, buckets=REQUEST_BUCKETS,
        )
        self._prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens of finished requests.", labels, registry=r
        )
        self._generation_tokens = Counter(
            f"{PREFIX}_generation_tokens", "Output tokens generated.", labels, registry=r
        )
        self._preemptions = Counter(
            f"{PREFIX}_num_preemptions", "Requests preempted (KV blocks freed, to be recomputed).",
            labels, registry=r,
        )
        self._finished = Counter(
            f"{PREFIX}_requests_finished", "Finished requests by finish reason.",
            [MODEL_LABEL, REASON_LABEL], registry=r,
        )
        self._requests = Counter(
            f"{PREFIX}_requests", "RPCs by method and the gRPC status their client saw "
            "(refusals included).", [MODEL_LABEL, METHOD_LABEL, CODE_LABEL], registry=r,
        )
        self._load = _LoadCollector()
        r.register(self._load)
        ProcessCollector(registry=r)
        self._last_token: dict[str, float] = {}

    def bind(self, model: ModelInfo, load: LoadSource) -> None:
        """Label every series with the served model's name; ``load`` feeds the gauges. Call
        once, before the hooks below."""
        model_name = model.name
        self._load.model_name = model_name
        self._load.block_size = model.block_size
        self._load.load = load
        self._ttft_m = self._ttft.labels(model_name)
        self._itl_m = self._itl.labels(model_name)
        self._e2e_m = self._e2e.labels(model_name)
        self._queue_m = self._queue.labels(model_name)
        self._prompt_m = self._prompt_tokens.labels(model_name)
        self._generation_m = self._generation_tokens.labels(model_name)
        self._preemptions_m = self._preemptions.labels(model_name)
        self._finished_m = {r: self._finished.labels(model_name, r.value) for r in FinishReason}
        for series in (*self._finished_m.values(), self._preemptions_m):
            series.inc(0)  # every series exists from the start, at zero

    def on_rpc_end(self, method: str, code: grpc.StatusCode) -> None:
        """One RPC answered (from the event loop: a counter is thread-safe). Before ``bind``
        the model's name is not known yet; those RPCs (UNAVAILABLE while loading) count under
        an empty one."""
        self._requests.labels(self._load.model_name, method, code.name).inc()

    def on_step(self, info: StepInfo) -> None:
        if info.num_preempted:
            self._preemptions_m.inc(info.num_preempted)

    def on_outputs(self, deltas: Sequence[RequestOutputDelta], now: float) -> None:
        """One engine delivery: every delta carries the tokens of one request."""
        last = self._last_token
        itl = self._itl_m
        generated = 0
        for delta in deltas:
            if delta.token_ids:
                generated += len(delta.token_ids)
                previous = last.get(delta.request_id)
                if previous is not None:
                    itl.observe(now - previous)
                last[delta.request_id] = now
            if delta.finished:
                last.pop(delta.request_id, None)
                self._on_finished(delta)
        if generated:
            self._generation_m.inc(generated)

    def _on_finished(self, delta: RequestOutputDelta) -> None:
        if delta.finish_reason is not None:
            self._finished_m[delta.finish_reason].inc()
        if delta.usage is not None:
            self._prompt_m.inc(delta.usage.prompt_tokens)
        times = delta.times
        if times is None:
            return
        if times.first_scheduled is not None:
            self._queue_m.observe(times.first_scheduled - times.arrival)
        if times.first_token is not None:
            self._ttft_m.observe(times.first_token - times.arrival)
        if times.finished is not None:
            self._e2e_m.observe(times.finished - times.arrival)
