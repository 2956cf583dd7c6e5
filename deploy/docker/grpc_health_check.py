"""Exit 0 when the local server's grpc.health.v1 check answers SERVING, else 1.

Docker's HEALTHCHECK can only run a command (it has no gRPC probe); Kubernetes does not use
this file, its probes speak grpc.health.v1 natively.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def is_serving(target: str, service: str, timeout_s: float) -> bool:
    """One Check call; any RPC failure (refused, deadline, unknown service) is not serving."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--service", default="", help='health service name; "" is the whole server')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds for the Check call")
    args = parser.parse_args(argv)
    return 0 if is_serving(f"{args.host}:{args.port}", args.service, args.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
