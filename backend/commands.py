"""The list of subcommands: each module that owns a job contributes its parser."""

from __future__ import annotations

from pagedserve.backend.offline_cli import register_bench, register_generate
from pagedserve.backend.runner.worker import register_worker
from pagedserve.backend.server.cli import register_serve
from pagedserve.clients.cli import register_chat

REGISTRATIONS = [register_serve, register_generate, register_chat, register_bench, register_worker]
