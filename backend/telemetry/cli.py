"""Telemetry flags of ``pagedserve serve`` (and of benchmarks that start a server)."""

from __future__ import annotations

import argparse
from typing import get_args

from pagedserve.backend.config import TelemetryConfig, TracesProtocol


def add_telemetry_args(parser: argparse.ArgumentParser) -> None:
    defaults = TelemetryConfig()
    group = parser.add_argument_group(
        "telemetry",
        "Tracing is off unless an OTLP endpoint is set here or by OTEL_EXPORTER_OTLP_[TRACES_]"
        "ENDPOINT; OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER[_ARG] and the other OTEL_* variables "
        "apply.",
    )
    group.add_argument(
        "--otlp-traces-endpoint", default=defaults.otlp_traces_endpoint, metavar="URL",
        help="export spans here (grpc: http://host:4317; http/protobuf: the full /v1/traces URL)",
    )
    group.add_argument(
        "--otlp-traces-protocol", choices=get_args(TracesProtocol),
        default=defaults.otlp_traces_protocol,
        help="default: OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL, else grpc",
    )
    group.add_argument(
        "--trace-engine-steps", action=argparse.BooleanOptionalAction,
        default=defaults.trace_engine_steps,
        help="an engine.step span per iteration, linked to the requests it served",
    )
    group.add_argument(
        "--metrics-port", type=int, default=defaults.metrics_port,
        help="Prometheus metrics port (0 picks a free one)",
    )
    group.add_argument(
        "--no-metrics", dest="metrics_port", action="store_const", const=None,
        help="serve no metrics",
    )
    group.add_argument(
        "--metrics-host", default=defaults.metrics_host,
        help="address the metrics endpoint listens on (0.0.0.0: every interface)",
    )


def telemetry_config_from_args(args: argparse.Namespace) -> TelemetryConfig:
    return TelemetryConfig(
        otlp_traces_endpoint=args.otlp_traces_endpoint,
        otlp_traces_protocol=args.otlp_traces_protocol,
        trace_engine_steps=args.trace_engine_steps,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
    )
