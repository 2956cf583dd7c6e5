"""Telemetry configuration: off by default, OTEL_* variables, the serve flags, sampling."""

from __future__ import annotations

import pytest
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Decision
from opentelemetry.trace import Link, SpanContext, TraceFlags

from pagedserve.backend.cli import build_parser
from pagedserve.backend.config import ServerConfig, TelemetryConfig
from pagedserve.backend.server.cli import server_config_from_args
from pagedserve.backend.telemetry.exporting import (
    LinkedRootSampler,
    build_tracer_provider,
    new_tracer_provider,
    otlp_exporter,
    service_resource,
)

OTEL_VARS = (
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES", "OTEL_TRACES_EXPORTER", "OTEL_SDK_DISABLED", "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARS:
        monkeypatch.delenv(name, raising=False)


def test_defaults_trace_nothing_and_serve_metrics_on_8002() -> None:
    config = ServerConfig().telemetry
    assert config.metrics_port == 8002
    assert build_tracer_provider(config) is None
    args = build_parser().parse_args(["serve"])
    assert server_config_from_args(args).telemetry == TelemetryConfig()


def test_serve_flags_map_onto_the_config() -> None:
    args = build_parser().parse_args([
        "serve", "--otlp-traces-endpoint", "http://collector:4318/v1/traces",
        "--otlp-traces-protocol", "http/protobuf", "--metrics-port", "0", "--no-trace-engine-steps",
    ])
    config = server_config_from_args(args).telemetry
    assert config.otlp_traces_endpoint == "http://collector:4318/v1/traces"
    assert config.otlp_traces_protocol == "http/protobuf"
    assert config.metrics_port == 0 and not config.trace_engine_steps
    off = server_config_from_args(build_parser().parse_args(["serve", "--no-metrics"]))
    assert off.telemetry.metrics_port is None


def test_endpoint_and_protocol_from_the_standard_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    assert isinstance(otlp_exporter(TelemetryConfig()), GrpcExporter)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
    exporter = otlp_exporter(TelemetryConfig())
    assert isinstance(exporter, HttpExporter)
    assert exporter._endpoint == "http://127.0.0.1:4317/v1/traces"  # the signal path is added
    # The flag wins over the variables and is used as given.
    flagged = otlp_exporter(
        TelemetryConfig(otlp_traces_endpoint="http://h:9/x", otlp_traces_protocol="http/protobuf")
    )
    assert isinstance(flagged, HttpExporter) and flagged._endpoint == "http://h:9/x"
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert otlp_exporter(TelemetryConfig()) is None


def test_unknown_protocol_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with pytest.raises(ValueError, match="http/json"):
        otlp_exporter(TelemetryConfig(otlp_traces_endpoint="http://h:1"))


def test_service_name(monkeypatch: pytest.MonkeyPatch) -> None:
    assert service_resource(TelemetryConfig()).attributes["service.name"] == "pagedserve"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    assert service_resource(TelemetryConfig()).attributes["service.name"] == "from-env"
    named = service_resource(TelemetryConfig(service_name="from-config"))
    assert named.attributes["service.name"] == "from-config"


def _link(sampled: bool) -> Link:
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    return Link(SpanContext(trace_id=1, span_id=2, is_remote=False, trace_flags=flags))


def test_step_roots_follow_the_requests_they_link_to() -> None:
    sampler = LinkedRootSampler(ALWAYS_OFF)
    root = Context()
    assert sampler.should_sample(root, 5, "engine.step", links=[_link(True)]).decision == (
        Decision.RECORD_AND_SAMPLE
    )
    assert sampler.should_sample(root, 5, "engine.step", links=[_link(False)]).decision == (
        Decision.DROP
    )
    assert sampler.should_sample(root, 5, "request").decision == Decision.DROP


def test_the_sampler_variable_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    exporter = InMemorySpanExporter()
    provider = new_tracer_provider(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    tracer.start_span("request").end()
    assert exporter.get_finished_spans() == ()
    assert "AlwaysOff" in provider.sampler.get_description()
