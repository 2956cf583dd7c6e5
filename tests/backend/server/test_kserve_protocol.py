"""The KServe protos are wire-compatible with Triton's, as tritonclient ships them.

Every message, field, enum value and method we declare is compared with tritonclient's own
descriptors (same full name, number, type, label, message type and oneof), so a wrong field
number or type fails here rather than as garbled data on the wire.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from tritonclient.grpc import model_config_pb2 as triton_config
from tritonclient.grpc import service_pb2 as triton_service

from pagedserve.backend.server import kserve_protocol as kp


def _field_signature(f: FieldDescriptor) -> tuple[object, ...]:
    message = f.message_type.full_name if f.message_type is not None else None
    enum = f.enum_type.full_name if f.enum_type is not None else None
    oneof = f.containing_oneof.name if f.containing_oneof is not None else None
    return (f.number, f.type, f.is_repeated, message, enum, oneof)


def _compare_enum(ours: EnumDescriptor, theirs: EnumDescriptor) -> None:
    for value in ours.values:
        assert value.name in theirs.values_by_name, (
            f"{ours.full_name}.{value.name} unknown to Triton"
        )
        assert value.number == theirs.values_by_name[value.name].number, (
            f"{ours.full_name}.{value.name}"
        )


def _compare_message(ours: Descriptor, theirs: Descriptor) -> int:
    """Assert every field of ``ours`` matches Triton's; return how many fields were checked."""
    assert ours.full_name == theirs.full_name
    checked = 0
    for f in ours.fields:
        assert f.name in theirs.fields_by_name, f"{ours.full_name}.{f.name} is not in Triton's"
        assert _field_signature(f) == _field_signature(theirs.fields_by_name[f.name]), (
            f"{ours.full_name}.{f.name}"
        )
        checked += 1
    for nested in ours.nested_types:
        checked += _compare_message(nested, theirs.nested_types_by_name[nested.name])
    for enum in ours.enum_types:
        _compare_enum(enum, theirs.enum_types_by_name[enum.name])
    return checked


@pytest.mark.parametrize(
    ("our_file", "their_file"),
    [
        ("pagedserve/inference/model_config.proto", triton_config.DESCRIPTOR),
        ("pagedserve/inference/grpc_service.proto", triton_service.DESCRIPTOR),
    ],
)
def test_every_declared_field_matches_triton(our_file: str, their_file: object) -> None:
    ours = kp.POOL.FindFileByName(our_file)
    assert ours.package == their_file.package == "inference"
    checked = 0
    for name, message in ours.message_types_by_name.items():
        checked += _compare_message(message, their_file.message_types_by_name[name])
    for name, enum in ours.enum_types_by_name.items():
        _compare_enum(enum, their_file.enum_types_by_name[name])
    assert checked > 20  # the comparison really walked the files


def test_service_methods_match_triton() -> None:
    ours = kp.service_descriptor()
    theirs = triton_service.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"
    assert {m.name for m in ours.methods} == {m.name for m in theirs.methods}
    for method in ours.methods:
        other = theirs.methods_by_name[method.name]
        assert method.input_type.full_name == other.input_type.full_name, method.name
        assert method.output_type.full_name == other.output_type.full_name, method.name
        assert (method.client_streaming, method.server_streaming) == (
            other.client_streaming,
            other.server_streaming,
        ), method.name


def test_grpc_service_imports_model_config_by_package_path() -> None:
    ours = kp.POOL.FindFileByName("pagedserve/inference/grpc_service.proto")
    assert [d.name for d in ours.dependencies] == ["pagedserve/inference/model_config.proto"]


def test_private_pool_coexists_with_tritonclient_in_one_process() -> None:
    # tritonclient has registered inference.* in the default pool; ours must still work and
    # bytes must cross between the two class families unchanged.
    request = kp.ModelInferRequest(
        model_name="m", id="42", raw_input_contents=[b"\x01\x00\x00\x00x"]
    )
    request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    request.parameters["temperature"].double_param = 0.5
    theirs = triton_service.ModelInferRequest.FromString(request.SerializeToString())
    assert theirs.inputs[0].name == "text_input" and theirs.id == "42"
    assert theirs.parameters["temperature"].double_param == 0.5
    assert kp.ModelInferRequest.FromString(theirs.SerializeToString()) == request


def test_generated_modules_import_with_the_installed_protobuf() -> None:
    # A fresh interpreter without tritonclient: the committed modules pass protobuf's
    # gencode/runtime version check and register under the expected names.
    code = (
        "from pagedserve.inference import grpc_service_pb2, grpc_service_pb2_grpc\n"
        "assert grpc_service_pb2.DESCRIPTOR.package == 'inference'\n"
        "assert hasattr(grpc_service_pb2_grpc, 'GRPCInferenceServiceStub')\n"
        "print(grpc_service_pb2.ModelInferRequest.DESCRIPTOR.full_name)\n"
    )
    result = subprocess.run(
        [sys.executable, "-W", "error::UserWarning", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "inference.ModelInferRequest"


def test_serialized_descriptor_reader_rejects_other_sources() -> None:
    with pytest.raises(ValueError, match="not a protoc-generated module"):
        kp.serialized_file_descriptor("x = 1\n")
