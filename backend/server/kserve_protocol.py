"""The KServe v2 / Triton message classes, built in a descriptor pool of their own.

Triton's clients (``tritonclient``) register the very same ``inference.*`` message names in
protobuf's default descriptor pool, and a second registration of a name from another file is
refused there ("duplicate symbol"). So the server never imports the generated
``pagedserve.inference.*_pb2`` modules: it reads the serialized file descriptors out of them
and builds the classes in a private pool. A process can then run the server and a Triton client
side by side (tests, proxies, benchmarks), and the bytes on the wire are the same.
"""

from __future__ import annotations

import ast
from importlib import resources
from typing import TYPE_CHECKING, Any

from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message

if TYPE_CHECKING:
    # For their types only: importing them would register the names in the default pool.
    from pagedserve.inference import grpc_service_pb2 as gs
    from pagedserve.inference import model_config_pb2 as mc

GENERATED_PACKAGE = "pagedserve.inference"
# Dependencies first: grpc_service.proto imports model_config.proto.
GENERATED_MODULES = ("model_config_pb2.py", "grpc_service_pb2.py")
PROTO_PACKAGE = "inference"
SERVICE_NAME = f"{PROTO_PACKAGE}.GRPCInferenceService"


def serialized_file_descriptor(module_source: str) -> bytes:
    """The ``FileDescriptorProto`` bytes a protoc-generated Python module registers."""
    for node in ast.walk(ast.parse(module_source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "AddSerializedFile"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, bytes)
        ):
            return node.args[0].value
    raise ValueError("no AddSerializedFile(b'...') call: not a protoc-generated module")


def build_pool() -> descriptor_pool.DescriptorPool:
    """A fresh pool holding the protocol's two files."""
    pool = descriptor_pool.DescriptorPool()
    package = resources.files(GENERATED_PACKAGE)
    for name in GENERATED_MODULES:
        pool.AddSerializedFile(serialized_file_descriptor((package / name).read_text("utf-8")))
    return pool


POOL = build_pool()


def message_class(name: str) -> type[Message]:
    """The class of ``inference.<name>`` (nested types are attributes of their parent)."""
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"{PROTO_PACKAGE}.{name}"))


def service_descriptor() -> ServiceDescriptor:
    return POOL.FindServiceByName(SERVICE_NAME)


def _typed(name: str) -> Any:
    """``message_class(name)``, for a module name declared with the class of the generated stubs
    (``pagedserve/inference/*_pb2.pyi``): built from the same descriptor, the class has exactly
    the fields those declare, though it is not the generated module's class object."""
    return message_class(name)


ServerLiveRequest: type[gs.ServerLiveRequest] = _typed("ServerLiveRequest")
ServerLiveResponse: type[gs.ServerLiveResponse] = _typed("ServerLiveResponse")
ServerReadyRequest: type[gs.ServerReadyRequest] = _typed("ServerReadyRequest")
ServerReadyResponse: type[gs.ServerReadyResponse] = _typed("ServerReadyResponse")
ModelReadyRequest: type[gs.ModelReadyRequest] = _typed("ModelReadyRequest")
ModelReadyResponse: type[gs.ModelReadyResponse] = _typed("ModelReadyResponse")
ServerMetadataRequest: type[gs.ServerMetadataRequest] = _typed("ServerMetadataRequest")
ServerMetadataResponse: type[gs.ServerMetadataResponse] = _typed("ServerMetadataResponse")
ModelMetadataRequest: type[gs.ModelMetadataRequest] = _typed("ModelMetadataRequest")
ModelMetadataResponse: type[gs.ModelMetadataResponse] = _typed("ModelMetadataResponse")
ModelConfigRequest: type[gs.ModelConfigRequest] = _typed("ModelConfigRequest")
ModelConfigResponse: type[gs.ModelConfigResponse] = _typed("ModelConfigResponse")
ModelConfig: type[mc.ModelConfig] = _typed("ModelConfig")
ModelInput: type[mc.ModelInput] = _typed("ModelInput")
ModelOutput: type[mc.ModelOutput] = _typed("ModelOutput")
ModelStatisticsRequest: type[gs.ModelStatisticsRequest] = _typed("ModelStatisticsRequest")
ModelStatisticsResponse: type[gs.ModelStatisticsResponse] = _typed("ModelStatisticsResponse")
ModelStatistics: type[gs.ModelStatistics] = _typed("ModelStatistics")
InferParameter: type[gs.InferParameter] = _typed("InferParameter")
InferTensorContents: type[gs.InferTensorContents] = _typed("InferTensorContents")
ModelInferRequest: type[gs.ModelInferRequest] = _typed("ModelInferRequest")
ModelInferResponse: type[gs.ModelInferResponse] = _typed("ModelInferResponse")
ModelStreamInferResponse: type[gs.ModelStreamInferResponse] = _typed("ModelStreamInferResponse")
# model_config.proto's DataType enum: DATA_TYPE.values_by_name["TYPE_STRING"].number.
DATA_TYPE = POOL.FindEnumTypeByName(f"{PROTO_PACKAGE}.DataType")
