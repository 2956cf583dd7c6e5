"""Clients that keep connections alive with frequent pings are not sent away."""

from __future__ import annotations

import time

import grpc

from pagedserve.backend.server.server import BackgroundServer
from pagedserve.clients.client import CHANNEL_OPTIONS
from pagedserve.v1 import generation_pb2 as pb
from pagedserve.v1 import generation_pb2_grpc as pb_grpc

# Pings about once a second while idle (gRPC clamps lower values). A server on gRPC's default
# policy (one ping per 5 minutes without data) sends GOAWAY "too_many_pings" after a few.
EAGER_PINGS = (
    ("grpc.keepalive_time_ms", 200),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_sent_ping_interval_without_data_ms", 100),
)
# Long enough for the default policy's ping strikes to run out (checked: the channel then
# drops to IDLE within this time).
IDLE_S = 6.0


def test_frequent_client_pings_keep_the_connection(tiny_server: BackgroundServer) -> None:
    with grpc.insecure_channel(tiny_server.address, options=[*CHANNEL_OPTIONS, *EAGER_PINGS]) as ch:
        states: list[grpc.ChannelConnectivity] = []
        ch.subscribe(states.append, try_to_connect=True)
        stub = pb_grpc.GenerationServiceStub(ch)
        request = pb.GenerateRequest(prompt="Keep", max_tokens=2)
        assert stub.Complete(request).usage.completion_tokens == 2
        time.sleep(IDLE_S)  # idle, pinging all along
        ready = grpc.ChannelConnectivity.READY
        assert ready in states
        assert all(s == ready for s in states[states.index(ready) :]), states
        assert stub.Complete(request).usage.completion_tokens == 2
        ch.unsubscribe(states.append)
