"""``grpc.health.v1.Health`` for a server that drains.

grpc's reference servicer keeps every ``Watch`` stream open until the server cancels it, and a
graceful stop waits for every open RPC: one client watching health (client-side health checking
does) would hold a drain open until its deadline. Here ``close()`` ends each ``Watch`` once it
has sent the current status, so a draining server waits only for real work.
"""

from __future__ import annotations

import asyncio
from typing import TypeAlias

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# A HealthCheckResponse.ServingStatus value (SERVING, NOT_SERVING ...): protobuf enum values
# are ints.
Status: TypeAlias = int


class HealthServicer(health_pb2_grpc.HealthServicer):
    """Check and Watch over per-service statuses set by the server. Runs on the server loop."""

    def __init__(self) -> None:
        self._statuses: dict[str, Status] = {}
        self._changed = asyncio.Condition()
        self._closed = False

    async def set(self, service: str, status: Status) -> None:
        async with self._changed:
            self._statuses[service] = status
            self._changed.notify_all()

    async def close(self) -> None:
        """No further changes: every Watch sends the current status and ends (OK)."""
        async with self._changed:
            self._closed = True
            self._changed.notify_all()

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self._statuses.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> None:
        sent: Status | None = None
        while True:
            async with self._changed:
                status = self._statuses.get(
                    request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
                )
                closed = self._closed
                if status == sent and not closed:
                    await self._changed.wait()
                    continue
            # Written outside the lock: a slow watcher must not hold up ``set``.
            if status != sent:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                sent = status
            if closed:
                return
