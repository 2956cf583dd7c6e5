"""``pagedserve traces``: a local OTLP/gRPC endpoint that prints each request's span tree.

For seeing what a traced server records without running a tracing backend: start it, point a
server's ``--otlp-traces-endpoint`` at it, and every finished request prints as a tree, its
SERVER span first, then the phases under it with their durations and attributes::

    trace 5b8aa5a2d2c872e8321cf37308d69df2
    pagedserve.v1.GenerationService/Generate  SERVER  412.3 ms  rpc.method=Generate ...
      queue  1.2 ms  pagedserve.time_in_queue=0.0012
      prefill  35.0 ms  pagedserve.prefill.chunks=1
      decode  370.1 ms

A request's tree prints when its SERVER span arrives: the server ends that span last, after
its phases, and exports them in the same batch or before it. ``engine.step`` spans (with
``--trace-engine-steps``) are traces of their own, linked to the requests; they are counted,
not printed.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections import defaultdict
from typing import Any, TextIO

from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from pagedserve.backend.telemetry.collector import Collector

DEFAULT_PORT = 4317  # OTLP/gRPC's registered port
_KINDS = {
    Span.SPAN_KIND_SERVER: "SERVER",
    Span.SPAN_KIND_CLIENT: "CLIENT",
    Span.SPAN_KIND_INTERNAL: "",
    Span.SPAN_KIND_PRODUCER: "PRODUCER",
    Span.SPAN_KIND_CONSUMER: "CONSUMER",
}


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def _describe(span: Span, depth: int, attributes: bool) -> str:
    ms = (span.end_time_unix_nano - span.start_time_unix_nano) / 1e6
    parts = [f"{'  ' * depth}{span.name}"]
    kind = _KINDS.get(span.kind, "")
    if kind:
        parts.append(kind)
    parts.append(f"{ms:.1f} ms")
    if span.status.code == span.status.STATUS_CODE_ERROR:
        parts.append(f"ERROR {span.status.message}".rstrip())
    if attributes:
        parts.extend(f"{a.key}={_value(a.value)}" for a in span.attributes)
    line = "  ".join(parts)
    events = [
        f"{'  ' * (depth + 1)}! {e.name} at +{(e.time_unix_nano - span.start_time_unix_nano) / 1e6:.1f} ms"
        for e in span.events
    ]
    return "\n".join([line, *events])


class TracePrinter:
    """Collects spans by trace and prints a request's tree when its SERVER span arrives."""

    def __init__(self, out: TextIO, attributes: bool = True) -> None:
        self.out = out
        self.attributes = attributes
        self.num_printed = 0
        self.num_step_spans = 0
        self._traces: defaultdict[bytes, list[Span]] = defaultdict(list)
        self._lock = threading.Lock()

    def add(self, spans: list[Span]) -> int:
        """Take exported spans; returns how many trees this printed."""
        printed = 0
        with self._lock:
            for span in spans:
                if span.name == "engine.step":
                    self.num_step_spans += 1
                    continue
                self._traces[span.trace_id].append(span)
            for span in spans:
                if span.kind == Span.SPAN_KIND_SERVER and span.trace_id in self._traces:
                    self._print(self._traces.pop(span.trace_id), span)
                    printed += 1
        self.num_printed += printed
        return printed

    def _print(self, spans: list[Span], root: Span) -> None:
        children: defaultdict[bytes, list[Span]] = defaultdict(list)
        for span in spans:
            if span is not root:
                children[span.parent_span_id].append(span)
        lines = [f"trace {root.trace_id.hex()}"]

        def walk(span: Span, depth: int) -> None:
            lines.append(_describe(span, depth, self.attributes))
            for child in sorted(children[span.span_id], key=lambda s: s.start_time_unix_nano):
                walk(child, depth + 1)

        walk(root, 0)
        print("\n".join(lines), file=self.out, flush=True)


def run(host: str, port: int, count: int | None, attributes: bool, out: TextIO = sys.stdout) -> int:
    if count is not None and count < 1:
        raise ValueError(f"--count must be at least 1, got {count}")
    printer = TracePrinter(out, attributes)
    done = threading.Event()

    def received(spans: list[Span]) -> None:
        printer.add(spans)
        if count is not None and printer.num_printed >= count:
            done.set()

    stops = (signal.SIGTERM, signal.SIGINT)
    previous = [signal.signal(signum, lambda *_: done.set()) for signum in stops]
    try:
        with Collector(host, port, keep=False, listener=received) as collector:
            print(f"listening on {collector.endpoint} (serve with --otlp-traces-endpoint "
                  f"{collector.endpoint})", file=out, flush=True)
            done.wait()
    finally:
        for signum, handler in zip(stops, previous):
            signal.signal(signum, handler)
    return 0


def register_traces(sub: Any) -> None:
    parser = sub.add_parser(
        "traces", help="print the span trees a traced server exports (a local OTLP/gRPC endpoint)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help="OTLP/gRPC port to listen on (0 picks a free one)")
    parser.add_argument("--count", type=int, metavar="N",
                        help="exit after printing N traces (default: run until Ctrl-C)")
    parser.add_argument("--no-attributes", dest="attributes", action="store_false",
                        help="print names and durations only")
    parser.set_defaults(func=lambda args: run(args.host, args.port, args.count, args.attributes))
