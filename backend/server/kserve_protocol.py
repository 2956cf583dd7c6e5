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

from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message

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


ServerLiveRequest = message_class("ServerLiveRequest")
ServerLiveResponse = message_class("ServerLiveResponse")
ServerReadyRequest = message_class("ServerReadyRequest")
ServerReadyResponse = message_class("ServerReadyResponse")
ModelReadyRequest = message_class("ModelReadyRequest")
ModelReadyResponse = message_class("ModelReadyResponse")
ServerMetadataRequest = message_class("ServerMetadataRequest")
ServerMetadataResponse = message_class("ServerMetadataResponse")
ModelMetadataRequest = message_class("ModelMetadataRequest")
ModelMetadataResponse = message_class("ModelMetadataResponse")
ModelConfigRequest = message_class("ModelConfigRequest")
ModelConfigResponse = message_class("ModelConfigResponse")
ModelConfig = message_class("ModelConfig")
ModelInput = message_class("ModelInput")
ModelOutput = message_class("ModelOutput")
ModelStatisticsRequest = message_class("ModelStatisticsRequest")
ModelStatisticsResponse = message_class("ModelStatisticsResponse")
ModelStatistics = message_class("ModelStatistics")
InferParameter = message_class("InferParameter")
InferTensorContents = message_class("InferTensorContents")
ModelInferRequest = message_class("ModelInferRequest")
ModelInferResponse = message_class("ModelInferResponse")
ModelStreamInferResponse = message_class("ModelStreamInferResponse")
# model_config.proto's DataType enum: DATA_TYPE.values_by_name["TYPE_STRING"].number.
DATA_TYPE = POOL.FindEnumTypeByName(f"{PROTO_PACKAGE}.DataType")
