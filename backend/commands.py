"""The list of subcommands: each module that owns a job contributes its parser."""

from __future__ import annotations

from pagedserve.backend.offline_cli import register_bench, register_generate

REGISTRATIONS = [register_generate, register_bench]
