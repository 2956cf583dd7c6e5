"""Reflection describes every served service, KServe's (built in a private descriptor pool)
included, to a real reflection client: grpcio-reflection's descriptor database."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

# Triton's client registers its own copy of the inference.* names in the default pool, as a
# proxy or test process next to the server would: reflection must still serve the server's.
from tritonclient.grpc import service_pb2  # noqa: F401

from pagedserve.backend.server import kserve_protocol as kp
from pagedserve.backend.server.generation_service import SERVICE_NAME as NATIVE
from pagedserve.backend.server.server import BackgroundServer, reflection_pool

HEALTH = "grpc.health.v1.Health"


def test_every_listed_service_is_described_with_its_messages(
    tiny_server: BackgroundServer,
) -> None:
    with grpc.insecure_channel(tiny_server.address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        # A pool over the database: every lookup below is a reflection request to the server.
        remote = descriptor_pool.DescriptorPool(db)
        listed = set(db.get_services())
        assert {kp.SERVICE_NAME, NATIVE, HEALTH} <= listed
        for name in listed:
            assert remote.FindServiceByName(name).methods, name

        kserve = remote.FindServiceByName(kp.SERVICE_NAME)
        ours = kp.service_descriptor()
        assert [m.name for m in kserve.methods] == [m.name for m in ours.methods]
        stream = kserve.methods_by_name["ModelStreamInfer"]
        assert stream.input_type.full_name == "inference.ModelInferRequest"
        assert stream.output_type.full_name == "inference.ModelStreamInferResponse"

        request = remote.FindMessageTypeByName("inference.ModelInferRequest")
        expected = kp.POOL.FindMessageTypeByName("inference.ModelInferRequest")
        assert [f.name for f in request.fields] == [f.name for f in expected.fields]
        # A message of the imported file (model_config.proto), reached through its import.
        assert remote.FindMessageTypeByName("inference.ModelConfig").fields
        # By file name, as `grpcurl describe` resolves imports.
        assert remote.FindFileByName(ours.file.name).services_by_name["GRPCInferenceService"]


def test_unknown_symbol_is_still_not_found(tiny_server: BackgroundServer) -> None:
    with grpc.insecure_channel(tiny_server.address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        with pytest.raises(KeyError):
            db.FindFileContainingSymbol("inference.NoSuchMessage")


def test_a_service_missing_from_its_pool_is_refused_at_start() -> None:
    with pytest.raises(LookupError, match="no.such.Service"):
        reflection_pool({NATIVE: descriptor_pool.Default(), "no.such.Service": kp.POOL})
