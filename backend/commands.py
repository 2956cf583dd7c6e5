"""The list of subcommands: each module that owns a job contributes its parser."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagedserve.backend.offline_cli import register_bench, register_generate
from pagedserve.backend.runner.worker import register_worker
from pagedserve.backend.server.cli import register_serve
from pagedserve.backend.telemetry.trace_viewer import register_traces
from pagedserve.clients.cli import register_chat

if TYPE_CHECKING:
    from pagedserve.backend.cli import Register

REGISTRATIONS: list[Register] = [
    register_serve,
    register_generate,
    register_chat,
    register_bench,
    register_traces,
    register_worker,
]
