"""What every service shares (the gRPC ones and the HTTP API): the engine (once loaded) and the
serving phase.

One ``ServerState`` per server. The server creates it before the model loads, hands it to every
service (``add_generation_service``, ``add_kserve_service``, ...) and flips it through its phases:

    loading ──mark_ready(engine)──▶ serving ──mark_draining()──▶ draining
       └──mark_failed(error)──▶ failed

Services call ``unavailable_reason()`` at the top of each RPC and answer UNAVAILABLE with that
text when it is not None; otherwise ``engine`` is set. Read-only RPCs may keep answering while
draining (check ``engine is not None`` instead). Health follows the phase: every name in
``health_services`` (``""`` is the whole server) reports SERVING only while serving; the server
registers the names each ``add_*_service`` returns. ``served_model_name`` starts as the name the
config implies and becomes the engine's ``model_info.name`` at ``mark_ready``: read it per RPC.
All methods run on the server's event loop.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from grpc_health.v1 import health_pb2

from pagedserve.backend.server.health import HealthServicer
from pagedserve.backend.server.status import UnavailableError
from pagedserve.backend.telemetry.server_telemetry import ServerTelemetry

if TYPE_CHECKING:
    from pagedserve.backend.engine.client import EngineClient


@dataclass
class ServerState:
    """Shared serving state. ``engine`` is None until the model is loaded and warmed."""

    served_model_name: str
    health: HealthServicer = field(default_factory=HealthServicer)
    engine: EngineClient | None = None
    draining: bool = False
    load_error: str | None = None
    # Why the server is ending by itself (the model failed to load, the engine died): its
    # exit status is then 1 and this is its last word.
    fatal: str | None = None
    # Fully qualified service names whose health status follows the serving phase.
    health_services: list[str] = field(default_factory=lambda: [""])
    # Traces and metrics (backend/telemetry): services open their RPC spans through it.
    telemetry: ServerTelemetry = field(default_factory=ServerTelemetry.disabled)
    # Set when the drain starts, for long-lived calls that must end then (idle KServe streams).
    drain_started: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def ready(self) -> bool:
        """True once the engine is loaded and warmed (stays True while draining)."""
        return self.engine is not None

    @property
    def serving(self) -> bool:
        return self.unavailable_reason() is None

    def serving_engine(self) -> EngineClient:
        """The engine, for a new RPC; UnavailableError naming why when one cannot be served."""
        reason = self.unavailable_reason()
        if reason is not None:
            raise UnavailableError(reason)
        assert self.engine is not None
        return self.engine

    def unavailable_reason(self) -> str | None:
        """Why a new RPC cannot be served now, or None when it can."""
        if self.load_error is not None:
            return f"model failed to load: {self.load_error}"
        if self.engine is None:
            return "model is loading"
        if self.draining:
            return "server is shutting down"
        if not self.engine.is_alive:
            return "engine has stopped"
        return None

    async def register_health_service(self, name: str) -> None:
        """Make ``name`` report health with the server (services call this when added)."""
        if name not in self.health_services:
            self.health_services.append(name)
        await self._publish()

    async def mark_ready(self, engine: EngineClient) -> None:
        # The engine's name is authoritative (it knows the default model's name).
        self.served_model_name = engine.model_info.name
        self.engine = engine
        await self._publish()

    async def mark_failed(self, error: str) -> None:
        self.load_error = error
        await self._publish()

    async def mark_draining(self) -> None:
        """NOT_SERVING for good: health watches get it and end, so they do not hold the drain."""
        self.draining = True
        self.drain_started.set()
        await self._publish()
        await self.health.close()

    async def refresh(self) -> None:
        """Re-publish health (the engine loop may have died since the last change)."""
        await self._publish()

    async def _publish(self) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in self.health_services:
            await self.health.set(name, status)
