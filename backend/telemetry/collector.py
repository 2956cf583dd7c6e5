"""A minimal OTLP/gRPC trace sink: ``collector.trace.v1.TraceService/Export`` on one port.

For benchmarks (a local collector that costs the server what a real one would: the export), for
checking a server's export end to end, and under ``pagedserve traces``, which prints what arrives. Run it alone with
``python -m pagedserve.backend.telemetry.collector --port 4317``; it prints the port it bound
and, on exit, how many spans it received.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as pb_grpc
from opentelemetry.proto.trace.v1.trace_pb2 import Span

_WORKERS = 2
_STOP_GRACE_S = 1.0


SpanListener = Callable[[list[Span]], None]


class SpanSink(pb_grpc.TraceServiceServicer):
    """Keeps every exported span (``keep=True``) or only counts them; a ``listener`` gets
    each export's spans as they arrive (on a gRPC worker thread)."""

    def __init__(self, keep: bool = True, listener: SpanListener | None = None) -> None:
        self.keep = keep
        self.listener = listener
        self.spans: list[Span] = []
        self.num_spans = 0
        self.num_exports = 0
        self._lock = threading.Lock()
        self.received = threading.Condition(self._lock)

    def Export(
        self, request: pb.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> pb.ExportTraceServiceResponse:
        spans = [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]
        with self._lock:
            self.num_exports += 1
            self.num_spans += len(spans)
            if self.keep:
                self.spans.extend(spans)
            self.received.notify_all()
        if self.listener is not None:
            self.listener(spans)
        return pb.ExportTraceServiceResponse()

    def wait_for(self, predicate: Callable[[list[Span]], bool], timeout_s: float) -> bool:
        """Block until ``predicate(spans)`` holds (spans kept so far), or the timeout."""
        with self._lock:
            return self.received.wait_for(lambda: predicate(self.spans), timeout_s)


class Collector:
    """The sink on a loopback gRPC port (0 picks a free one)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        keep: bool = True,
        listener: SpanListener | None = None,
    ) -> None:
        self.sink = SpanSink(keep, listener)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=_WORKERS))
        pb_grpc.add_TraceServiceServicer_to_server(self.sink, self._server)
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot bind {host}:{port}")
        self.endpoint = f"http://{host}:{self.port}"

    def start(self) -> Collector:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(_STOP_GRACE_S).wait()

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with Collector(args.host, args.port, keep=False) as collector:
        print(f"listening {collector.port}", flush=True)
        stop.wait()
        print(f"received {collector.sink.num_spans} spans in {collector.sink.num_exports} "
              "exports", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
