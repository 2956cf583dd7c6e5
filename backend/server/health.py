"""``grpc.health.v1.Health`` for a server that drains.

grpc's reference servicer keeps every ``Watch`` stream open until the server cancels it, and a
graceful stop waits for every open RPC: one client watching health (client-side health checking
does) would hold a drain open until its deadline. Here ``close()`` ends each ``Watch`` once it
has sent the current status, so a draining server waits only for real work.
"""

from __future__ import annotations

import asyncio
from typing import NoReturn, TypeAlias

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagedserve.backend.server.status import bounded_details
from pagedserve.backend.server.wire import UndecodableRequest, tolerant_deserializer

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
        self,
        request: health_pb2.HealthCheckRequest | UndecodableRequest,
        context: grpc.aio.ServicerContext,
    ) -> health_pb2.HealthCheckResponse:
        if isinstance(request, UndecodableRequest):
            await _refuse(context, request)
        status = self._statuses.get(request.service)
        if status is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, bounded_details(f"unknown service {request.service!r}")
            )
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self,
        request: health_pb2.HealthCheckRequest | UndecodableRequest,
        context: grpc.aio.ServicerContext,
    ) -> None:
        if isinstance(request, UndecodableRequest):
            await _refuse(context, request)
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


async def _refuse(context: grpc.aio.ServicerContext, request: UndecodableRequest) -> NoReturn:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{request.field}: {request.reason}")
    raise AssertionError("context.abort returned")  # it raises


def add_health_service(server: grpc.aio.Server, servicer: HealthServicer) -> None:
    """Register ``servicer`` as grpc.health.v1.Health, with the tolerant deserializer: bytes
    that do not parse are INVALID_ARGUMENT, not the generated handlers' UNKNOWN."""
    request = tolerant_deserializer(health_pb2.HealthCheckRequest)
    response = health_pb2.HealthCheckResponse.SerializeToString
    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(
            servicer.Check, request_deserializer=request, response_serializer=response
        ),
        "Watch": grpc.unary_stream_rpc_method_handler(
            servicer.Watch, request_deserializer=request, response_serializer=response
        ),
    }
    name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
