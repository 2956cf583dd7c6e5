"""Generate the Python protocol modules from every ``.proto`` under ``protos/pagedserve/``.

``python -m pagedserve.backend.server.protogen`` (``make proto``) writes ``*_pb2.py``,
``*_pb2.pyi`` and ``*_pb2_grpc.py`` next to each ``.proto``, with ``protos/`` as the include
root, so ``protos/pagedserve/v1/generation.proto`` becomes ``pagedserve.v1.generation_pb2``.
The generated files are committed (clients need no grpc-tools); a test regenerates them into a
temporary directory and fails when they differ.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

# backend/server/protogen.py -> repository root.
REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
PROTO_PACKAGE = "pagedserve"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Every .proto of the package, relative to ``proto_root`` (the include root), sorted."""
    return sorted(p.relative_to(proto_root) for p in (proto_root / PROTO_PACKAGE).rglob("*.proto"))


def generated_files(root: Path) -> list[Path]:
    """The generated modules under ``root``, relative to it, sorted."""
    return sorted(
        p.relative_to(root)
        for p in (root / PROTO_PACKAGE).rglob("*")
        if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    )


def generate(out_dir: Path = PROTO_ROOT, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc over every .proto into ``out_dir``; return the generated files (relative)."""
    from grpc_tools import protoc  # test-only dependency: imported on use

    protos = proto_files(proto_root)
    if not protos:
        raise FileNotFoundError(f"no .proto files under {proto_root / PROTO_PACKAGE}")
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    argv = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p) for p in protos),
    ]
    code = protoc.main(argv)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}")
    return generated_files(out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pagedserve.backend.server.protogen")
    parser.add_argument(
        "--out", type=Path, default=PROTO_ROOT, help="output root (default: protos/, in place)"
    )
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(args.out / path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
