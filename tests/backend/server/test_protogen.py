"""The committed protocol modules are exactly what `make proto` generates now."""

from __future__ import annotations

from pathlib import Path

from pagedserve.backend.server import protogen


def test_every_proto_is_found() -> None:
    protos = protogen.proto_files()
    assert Path("pagedserve/v1/generation.proto") in protos
    assert all(p.parts[0] == "pagedserve" for p in protos)


def test_generated_modules_are_not_stale(tmp_path: Path) -> None:
    fresh = protogen.generate(tmp_path)
    committed = protogen.generated_files(protogen.PROTO_ROOT)
    # Every .proto yields its three modules, and nothing generated is left without a .proto.
    expected = {
        p.with_name(p.stem + suffix)
        for p in protogen.proto_files()
        for suffix in protogen.GENERATED_SUFFIXES
    }
    assert set(fresh) == expected
    assert set(committed) == expected, "run `make proto` and commit the result"
    stale = [
        str(p)
        for p in fresh
        if (tmp_path / p).read_bytes() != (protogen.PROTO_ROOT / p).read_bytes()
    ]
    assert not stale, f"stale generated modules (run `make proto`): {stale}"


def test_generated_module_imports_as_package_member() -> None:
    from pagedserve.v1 import generation_pb2, generation_pb2_grpc

    assert generation_pb2.DESCRIPTOR.package == "pagedserve.v1"
    assert hasattr(generation_pb2_grpc, "GenerationServiceStub")
