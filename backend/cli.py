"""The ``pagedserve`` command: serve | generate | chat | bench.

Engine flags are mapped onto the config dataclasses in ``config.py`` (one source of defaults);
each subcommand lives in the module that owns its job and registers its parser here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import MISSING, fields
from typing import Any, get_args

from pagedserve.backend.config import EngineConfig

# Engine flags: dataclass field -> CLI flag, generated from the config dataclasses.
_ENGINE_SECTIONS = [type(s) for s in EngineConfig().sections()[1:]]
_SKIP_FIELDS = {"hf_overrides"}


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Add one ``--flag`` per engine config field, defaults taken from the dataclasses."""
    group = parser.add_argument_group("engine")
    for section in _ENGINE_SECTIONS:
        for f in fields(section):
            if f.name in _SKIP_FIELDS:
                continue
            flag = "--" + f.name.replace("_", "-")
            default: Any = f.default if f.default is not MISSING else None
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
            if kind == "bool":
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
            elif kind == "int":
                group.add_argument(flag, type=int, default=default)
            elif kind == "float":
                group.add_argument(flag, type=float, default=default)
            elif kind in ("int | None",):
                group.add_argument(flag, type=int, default=default)
            elif kind == "LoadFormat":
                from pagedserve.backend.config import LoadFormat

                group.add_argument(flag, choices=get_args(LoadFormat), default=default)
            elif kind == "DType":
                from pagedserve.backend.config import DType

                group.add_argument(flag, choices=get_args(DType), default=default)
            else:
                group.add_argument(flag, default=default)
    parser.add_argument(
        "--no-cuda-graphs", dest="enable_cuda_graphs", action="store_false", default=True
    )
    parser.add_argument(
        "--overlap-scheduling", action=argparse.BooleanOptionalAction, default=None,
        help="queue each step before the previous one's tokens reach the host "
        "(default: on with CUDA; with tensor parallelism only when asked)",
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """Collect the engine flags back into an EngineConfig."""
    kwargs: dict[str, Any] = {}
    for section in _ENGINE_SECTIONS:
        for f in fields(section):
            if f.name in _SKIP_FIELDS or not hasattr(args, f.name):
                continue
            value = getattr(args, f.name)
            if value is None and f.default is MISSING:
                continue  # default_factory fields (cache_dir): keep the dataclass default
            kwargs[f.name] = value
    kwargs["enable_cuda_graphs"] = args.enable_cuda_graphs
    kwargs["overlap_scheduling"] = args.overlap_scheduling
    return EngineConfig.from_kwargs(**kwargs)


Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def _registrations() -> list[Register]:
    # Imported here so `pagedserve --help` stays fast and each command pulls only its own deps.
    from pagedserve.backend import commands

    return commands.REGISTRATIONS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for register in _registrations():
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
