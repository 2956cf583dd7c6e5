"""The server's own TracerProvider, configured from TelemetryConfig and the OTEL_* variables.

The provider is owned by the server rather than installed globally, so an embedding process
keeps its own global provider and tests can hand the server an in-memory exporter.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind, TraceState, get_current_span
from opentelemetry.util.types import Attributes

from pagedserve.backend.config import TelemetryConfig

DEFAULT_SERVICE_NAME = "pagedserve"
PROTOCOLS = ("grpc", "http/protobuf")
_UNKNOWN_SERVICE = "unknown_service"


class LinkedRootSampler(Sampler):
    """Samples a root span that links to a sampled span; otherwise asks ``delegate``.

    ``engine.step`` spans are roots linked to the requests they served: with a ratio sampler
    they must follow the requests' decision, not draw their own.
    """

    def __init__(self, delegate: Sampler) -> None:
        self._delegate = delegate

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        parent = get_current_span(parent_context).get_span_context()
        if not parent.is_valid and links and any(link.context.trace_flags.sampled for link in links):
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
        return self._delegate.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"LinkedRootSampler{{{self._delegate.get_description()}}}"


def traces_endpoint(config: TelemetryConfig) -> str | None:
    """Where traces go, or None when tracing is off (the default)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return None
    return (
        config.otlp_traces_endpoint
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or None
    )


def traces_protocol(config: TelemetryConfig) -> str:
    protocol = (
        config.otlp_traces_protocol
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()
    if protocol not in PROTOCOLS:
        raise ValueError(f"OTLP traces protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return protocol


def otlp_exporter(config: TelemetryConfig) -> SpanExporter | None:
    """The OTLP span exporter the config and environment ask for (None: tracing off).

    An endpoint given in the config is used as is, like OTEL_EXPORTER_OTLP_TRACES_ENDPOINT;
    one from OTEL_EXPORTER_OTLP_ENDPOINT gets the signal path the exporter adds (http).
    """
    if traces_endpoint(config) is None:
        return None
    explicit = config.otlp_traces_endpoint
    if traces_protocol(config) == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=explicit)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpSpanExporter,
    )

    return HttpSpanExporter(endpoint=explicit)


def service_resource(config: TelemetryConfig) -> Resource:
    """OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME apply; the config's name wins."""
    resource = Resource.create({SERVICE_NAME: config.service_name} if config.service_name else {})
    name = str(resource.attributes.get(SERVICE_NAME, ""))
    if not name or name.startswith(_UNKNOWN_SERVICE):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    return resource


def new_tracer_provider(processor: SpanProcessor, resource: Resource | None = None) -> TracerProvider:
    """A provider with the sampler OTEL_TRACES_SAMPLER names, made link-aware for step spans."""
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    provider.sampler = LinkedRootSampler(provider.sampler)
    provider.add_span_processor(processor)
    return provider


def build_tracer_provider(config: TelemetryConfig) -> TracerProvider | None:
    """The server's provider exporting over OTLP in batches, or None when tracing is off."""
    exporter = otlp_exporter(config)
    if exporter is None:
        return None
    return new_tracer_provider(BatchSpanProcessor(exporter), service_resource(config))
