"""TLS, mTLS and the API key against real servers on loopback, with real clients.

Three servers: TLS + API key (metrics over HTTPS behind the key), mTLS with a certificate
issued to another name than the address dialled (metrics over HTTPS asking for a client
certificate too), and plaintext + API key (metrics left open, the default; the mesh set-up).
Every RPC is found through reflection, so an RPC or service added later is covered without
touching these tests.
"""

from __future__ import annotations

import asyncio
import http.client
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from tritonclient.utils import InferenceServerException

from pagedserve.backend.server.security import OPEN_SERVICES
from pagedserve.backend.server.server import BackgroundServer
from pagedserve.clients.client import AsyncGenerationClient, GenerationClient
from pagedserve.v1 import generation_pb2 as pb
from tests.backend.server.harness import (
    TINY_ENGINE,
    SlowSteps,
    all_blocks_free,
    running_server,
    wait_for,
)
from tests.certs import RENAMED_SERVER, Pki

KEY = "k3y-0f-the-test-server"
OTHER_KEY = "another-server-s-key"
AUTH = (("authorization", f"Bearer {KEY}"),)
CALL_TIMEOUT_S = 30.0
# A client that refused the handshake says so at once; nothing to wait for.
FAIL_FAST_S = 10.0
FREE_TIMEOUT_S = 10.0
SLOW_STEP_S = 0.05

# Each a wrong way to present the key: none at all, another key, a prefix and an extension of
# the key, an empty token, another scheme, the token without a scheme, another header.
WRONG_CREDENTIALS: dict[str, tuple[tuple[str, str], ...]] = {
    "none": (),
    "other key": (("authorization", f"Bearer {OTHER_KEY}"),),
    "prefix": (("authorization", f"Bearer {KEY[:-1]}"),),
    "extension": (("authorization", f"Bearer {KEY}x"),),
    "empty token": (("authorization", "Bearer "),),
    "basic scheme": (("authorization", f"Basic {KEY}"),),
    "no scheme": (("authorization", KEY),),
    "x-api-key": (("x-api-key", KEY),),
}
# What the reflection walk must find at least (it proves the walk is not empty).
EXPECTED_METHODS = {
    "pagedserve.v1.GenerationService/Generate",
    "pagedserve.v1.GenerationService/Complete",
    "pagedserve.v1.GenerationService/Tokenize",
    "pagedserve.v1.GenerationService/GetModelInfo",
    "pagedserve.v1.GenerationService/GetLoad",
    "inference.GRPCInferenceService/ServerLive",
    "inference.GRPCInferenceService/ServerReady",
    "inference.GRPCInferenceService/ModelReady",
    "inference.GRPCInferenceService/ServerMetadata",
    "inference.GRPCInferenceService/ModelMetadata",
    "inference.GRPCInferenceService/ModelConfig",
    "inference.GRPCInferenceService/ModelStatistics",
    "inference.GRPCInferenceService/ModelInfer",
    "inference.GRPCInferenceService/ModelStreamInfer",
    "inference.GRPCInferenceService/RepositoryIndex",
}


# ---- servers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(tiny_llama_dir: Path, pki: Pki) -> Iterator[BackgroundServer]:
    tls = {"ssl_certfile": pki.server.cert, "ssl_keyfile": pki.server.key}
    metrics = {
        "metrics_host": "127.0.0.1",
        "metrics_ssl_certfile": pki.server.cert,
        "metrics_ssl_keyfile": pki.server.key,
        "metrics_api_key": KEY,
    }
    with running_server(
        tiny_llama_dir, server_options={**tls, "api_key": KEY}, telemetry_options=metrics,
        **TINY_ENGINE,
    ) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(tiny_llama_dir: Path, pki: Pki) -> Iterator[BackgroundServer]:
    tls = {
        "ssl_certfile": pki.renamed_server.cert,
        "ssl_keyfile": pki.renamed_server.key,
        "ssl_ca_certs": pki.ca,
    }
    metrics = {"metrics_host": "127.0.0.1", **{f"metrics_{k}": v for k, v in tls.items()}}
    with running_server(
        tiny_llama_dir, server_options=tls, telemetry_options=metrics, **TINY_ENGINE
    ) as server:
        yield server


@pytest.fixture(scope="module")
def key_server(tiny_llama_dir: Path) -> Iterator[BackgroundServer]:
    with running_server(
        tiny_llama_dir, server_options={"api_key": KEY},
        telemetry_options={"metrics_host": "127.0.0.1"}, **TINY_ENGINE,
    ) as server:
        yield server


def _pem(path: str) -> bytes:
    return Path(path).read_bytes()


def tls_channel(address: str, pki: Pki, **options: Any) -> grpc.Channel:
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(_pem(pki.ca)), **options)


# ---- TLS and mTLS -----------------------------------------------------------------------------


def test_tls_client_needs_the_ca(tls_server: BackgroundServer, pki: Pki) -> None:
    address = tls_server.address
    # gRPC's default roots do not hold the test CA: the client refuses the server, at once.
    with GenerationClient(address, ssl=True, api_key=KEY) as untrusting:
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            untrusting.wait_until_serving(timeout_s=60.0)
        assert time.monotonic() - start < FAIL_FAST_S
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "handshake" in (refused.value.details() or "").lower()
    with GenerationClient(address, ssl_ca_certs=pki.other_ca, api_key=KEY) as wrong_ca:
        with pytest.raises(grpc.RpcError) as refused:
            wrong_ca.complete("Hello", max_tokens=2)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    with GenerationClient(address, api_key=KEY) as plaintext:
        with pytest.raises(grpc.RpcError) as refused:
            plaintext.complete("Hello", max_tokens=2)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    with GenerationClient(address, ssl_ca_certs=pki.ca, api_key=KEY) as client:
        client.wait_until_serving(timeout_s=FAIL_FAST_S)
        whole = client.complete("Hello", max_tokens=6, temperature=0.0, ignore_eos=True)
        streamed = list(client.generate("Hello", max_tokens=6, temperature=0.0, ignore_eos=True))
        assert client.tokenize("Hello") and client.model_info().model_name == "tiny-llama"
    assert len(whole.token_ids) == 6
    assert [t for r in streamed for t in r.token_ids] == list(whole.token_ids)


async def test_async_client_over_tls(tls_server: BackgroundServer, pki: Pki) -> None:
    async with AsyncGenerationClient(
        tls_server.address, ssl_ca_certs=pki.ca, api_key=KEY
    ) as client:
        await client.wait_until_serving(timeout_s=FAIL_FAST_S)
        whole = await client.complete("Hello", max_tokens=4, temperature=0.0, ignore_eos=True)
        pieces = [r async for r in client.generate("Hello", max_tokens=4, temperature=0.0,
                                                   ignore_eos=True)]
        load = await client.load()
    assert [t for r in pieces for t in r.token_ids] == list(whole.token_ids)
    assert load.num_total_blocks > 0
    async with AsyncGenerationClient(tls_server.address, ssl=True, api_key=KEY) as untrusting:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(untrusting.wait_until_serving(timeout_s=60.0), FAIL_FAST_S)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_server_wants_a_certificate_signed_by_its_ca(
    mtls_server: BackgroundServer, pki: Pki
) -> None:
    address = mtls_server.address
    named = {"ssl_ca_certs": pki.ca, "ssl_server_name": RENAMED_SERVER}
    refusals = {
        "no client certificate": GenerationClient(address, **named),
        "a certificate of another CA": GenerationClient(
            address, ssl_certfile=pki.stranger.cert, ssl_keyfile=pki.stranger.key, **named
        ),
        # Right certificate, but the server's is issued to another name than 127.0.0.1.
        "no server name override": GenerationClient(
            address, ssl_ca_certs=pki.ca, ssl_certfile=pki.client.cert,
            ssl_keyfile=pki.client.key,
        ),
    }
    for what, client in refusals.items():
        with client, pytest.raises(grpc.RpcError) as refused:
            client.complete("Hello", max_tokens=2)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, what
    # A misnamed certificate is refused by the client itself: no use waiting.
    with GenerationClient(address, ssl_ca_certs=pki.ca) as misnamed:
        start = time.monotonic()
        with pytest.raises(grpc.RpcError):
            misnamed.wait_until_serving(timeout_s=60.0)
        assert time.monotonic() - start < FAIL_FAST_S
    with GenerationClient(
        address, ssl_certfile=pki.client.cert, ssl_keyfile=pki.client.key, **named
    ) as client:
        response = client.complete("Hello", max_tokens=3, temperature=0.0, ignore_eos=True)
        assert client.health() == health_pb2.HealthCheckResponse.SERVING
    assert len(response.token_ids) == 3


# ---- the API key on every RPC -----------------------------------------------------------------


def registered_methods(channel: grpc.Channel) -> dict[str, tuple[bool, bool]]:
    """Every method of every service the server lists in reflection (health and reflection
    aside): ``service/method`` -> (client streaming, server streaming)."""
    database = ProtoReflectionDescriptorDatabase(channel)
    pool = DescriptorPool(database)
    methods: dict[str, tuple[bool, bool]] = {}
    for service_name in database.get_services():
        if service_name in OPEN_SERVICES:
            continue
        service = pool.FindServiceByName(service_name)
        for method in service.methods:
            methods[f"{service_name}/{method.name}"] = (
                method.client_streaming,
                method.server_streaming,
            )
    return methods


def call_raw(
    channel: grpc.Channel,
    method: str,
    shape: tuple[bool, bool],
    metadata: tuple[tuple[str, str], ...],
) -> grpc.StatusCode:
    """Call ``method`` with one empty message; the status it ends with."""
    client_streaming, server_streaming = shape
    path = f"/{method}"
    options: dict[str, Any] = {"metadata": metadata, "timeout": CALL_TIMEOUT_S}
    try:
        if client_streaming and server_streaming:
            for _ in channel.stream_stream(path)(iter([b""]), **options):
                pass
        elif client_streaming:
            channel.stream_unary(path)(iter([b""]), **options)
        elif server_streaming:
            for _ in channel.unary_stream(path)(b"", **options):
                pass
        else:
            channel.unary_unary(path)(b"", **options)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def methods(tls_server: BackgroundServer, pki: Pki) -> dict[str, tuple[bool, bool]]:
    with tls_channel(tls_server.address, pki) as channel:  # reflection needs no key
        found = registered_methods(channel)
    assert EXPECTED_METHODS <= set(found), EXPECTED_METHODS - set(found)
    return found


@pytest.mark.parametrize("credentials", WRONG_CREDENTIALS.values(), ids=WRONG_CREDENTIALS.keys())
def test_every_rpc_refuses_a_missing_or_wrong_key(
    tls_server: BackgroundServer,
    pki: Pki,
    methods: dict[str, tuple[bool, bool]],
    credentials: tuple[tuple[str, str], ...],
) -> None:
    with tls_channel(tls_server.address, pki) as channel:
        codes = {m: call_raw(channel, m, shape, credentials) for m, shape in methods.items()}
    let_through = {m: c for m, c in codes.items() if c != grpc.StatusCode.UNAUTHENTICATED}
    assert not let_through


def test_every_rpc_takes_the_right_key(
    tls_server: BackgroundServer, pki: Pki, methods: dict[str, tuple[bool, bool]]
) -> None:
    # An empty message is a bad request for most RPCs: any answer but UNAUTHENTICATED is the
    # service's own. The scheme is case-insensitive, and one right value among others will do.
    variants = [AUTH, (("authorization", f"bearer {KEY}"),),
                (("authorization", f"Bearer {OTHER_KEY}"), *AUTH)]
    with tls_channel(tls_server.address, pki) as channel:
        for credentials in variants:
            codes = {m: call_raw(channel, m, shape, credentials) for m, shape in methods.items()}
            refused = [m for m, c in codes.items() if c == grpc.StatusCode.UNAUTHENTICATED]
            assert not refused, credentials
    assert codes["inference.GRPCInferenceService/ServerLive"] == grpc.StatusCode.OK
    assert codes["pagedserve.v1.GenerationService/GetLoad"] == grpc.StatusCode.OK
    assert codes["pagedserve.v1.GenerationService/Generate"] == grpc.StatusCode.INVALID_ARGUMENT


def test_the_refusal_says_what_is_missing_and_never_echoes_the_token(
    tls_server: BackgroundServer, pki: Pki
) -> None:
    request = pb.GenerateRequest(prompt="Hello", max_tokens=2)
    with tls_channel(tls_server.address, pki) as channel:
        generate = channel.unary_stream(
            "/pagedserve.v1.GenerationService/Generate",
            request_serializer=pb.GenerateRequest.SerializeToString,
            response_deserializer=pb.GenerateResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as missing:
            list(generate(request, timeout=CALL_TIMEOUT_S))
        with pytest.raises(grpc.RpcError) as wrong:
            list(generate(request, timeout=CALL_TIMEOUT_S, metadata=WRONG_CREDENTIALS["prefix"]))
    assert missing.value.code() == wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer" in (missing.value.details() or "")
    assert wrong.value.details() == "invalid API key"
    for error in (missing.value, wrong.value):
        assert KEY[:8] not in str(error.details()) + str(error.trailing_metadata())


def test_an_unknown_method_is_refused_before_it_is_looked_up(
    tls_server: BackgroundServer, pki: Pki
) -> None:
    shape = (False, False)
    with tls_channel(tls_server.address, pki) as channel:
        for method in ("no.such.Service/Call", "pagedserve.v1.GenerationService/NoSuchRpc"):
            assert call_raw(channel, method, shape, ()) == grpc.StatusCode.UNAUTHENTICATED
            assert call_raw(channel, method, shape, AUTH) == grpc.StatusCode.UNIMPLEMENTED


def test_health_and_reflection_need_no_key(tls_server: BackgroundServer, pki: Pki) -> None:
    with tls_channel(tls_server.address, pki) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "pagedserve.v1.GenerationService", "inference.GRPCInferenceService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=5)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"pagedserve.v1.GenerationService", "grpc.health.v1.Health"} <= services


def test_plaintext_server_with_a_key(key_server: BackgroundServer) -> None:
    """Behind a mesh sidecar that does the TLS: the key still travels and is still required."""
    with GenerationClient(key_server.address) as anonymous:
        assert anonymous.health() == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as refused:
            anonymous.model_info()
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with GenerationClient(key_server.address, api_key=KEY) as client:
        # The key rides on every call made through the stub too, not only the helpers.
        info = client.stub.GetModelInfo(pb.GetModelInfoRequest())
        assert info.model_name == "tiny-llama"


# ---- cancel and drain behind the key ----------------------------------------------------------


def test_a_cancelled_stream_behind_the_key_frees_its_blocks(key_server: BackgroundServer) -> None:
    slow = SlowSteps(key_server, SLOW_STEP_S)
    with GenerationClient(key_server.address, api_key=KEY) as client, slow.on():
        call = client.generate(
            "Hello", max_tokens=500, ignore_eos=True, temperature=0.0, request_id="cancel-me"
        )
        stream = iter(call)
        next(stream)
        assert client.load().num_running == 1
        cancelled_at = time.time()
        call.cancel()
        with pytest.raises(grpc.RpcError) as cancelled:
            list(stream)
        wait_for(lambda: all_blocks_free(client), FREE_TIMEOUT_S, "the blocks to be freed")
    assert cancelled.value.code() == grpc.StatusCode.CANCELLED
    # As without a key: the abort lands within the step that was starting at the cancel.
    assert slow.steps_running("cancel-me", cancelled_at) <= 1


def test_a_stream_behind_the_key_finishes_during_the_drain(tiny_llama_dir: Path) -> None:
    with running_server(tiny_llama_dir, server_options={"api_key": KEY}, **TINY_ENGINE) as server:
        client = GenerationClient(server.address, api_key=KEY)
        stream = iter(client.generate("Hello", max_tokens=40, ignore_eos=True, temperature=0.0))
        first = next(stream)
        stopper = threading.Thread(target=server.stop)
        stopper.start()  # the drain: NOT_SERVING, new calls refused, this one goes on
        rest = list(stream)
        stopper.join(60)
        client.close()
    assert sum(len(r.token_ids) for r in [first, *rest]) == 40
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert server.exit_code == 0


# ---- KServe through tritonclient --------------------------------------------------------------


def _text_input(prompt: str) -> list[grpcclient.InferInput]:
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    return [text]


GREEDY = {"temperature": "0", "max_tokens": "4", "ignore_eos": "true"}
TRITON_AUTH = {"authorization": f"Bearer {KEY}"}


def test_tritonclient_over_tls_with_the_key(tls_server: BackgroundServer, pki: Pki) -> None:
    model = tls_server.state.served_model_name
    with grpcclient.InferenceServerClient(
        tls_server.address, ssl=True, root_certificates=pki.ca
    ) as triton:
        assert triton.is_server_live(headers=TRITON_AUTH)
        assert triton.is_model_ready(model, headers=TRITON_AUTH)
        result = triton.infer(model, _text_input("Hello"), parameters=GREEDY, headers=TRITON_AUTH)
        assert result.as_numpy("text_output")[0].decode().startswith("Hello")
        with pytest.raises(InferenceServerException) as refused:
            triton.is_server_live()
        assert refused.value.status() == "StatusCode.UNAUTHENTICATED"

        # The decoupled stream: refused without the key, served with it.
        results: list[Any] = []
        errors: list[InferenceServerException] = []
        done = threading.Event()

        def collect(result: Any, error: InferenceServerException | None) -> None:
            (errors.append(error) if error is not None else results.append(result))
            done.set()

        triton.start_stream(callback=collect, stream_timeout=CALL_TIMEOUT_S)
        try:
            triton.async_stream_infer(model, _text_input("Hello"), parameters=GREEDY)
        except InferenceServerException:
            pass  # the refusal can end the stream before the request is queued on it
        assert done.wait(CALL_TIMEOUT_S)
        triton.stop_stream()
        assert not results and "UNAUTHENTICATED" in str(errors[0].status())
        errors.clear()
        triton.start_stream(callback=collect, stream_timeout=CALL_TIMEOUT_S, headers=TRITON_AUTH)
        triton.async_stream_infer(
            model, _text_input("Hello"), parameters=GREEDY, request_id="with-key"
        )
        triton.stop_stream()
        assert not errors and results
        assert all(r.get_response().id == "with-key" for r in results)

    with grpcclient.InferenceServerClient(tls_server.address, ssl=True) as untrusting:
        with pytest.raises(InferenceServerException) as refused:
            untrusting.is_server_live(headers=TRITON_AUTH)
    assert refused.value.status() == "StatusCode.UNAVAILABLE"


def test_tritonclient_with_a_client_certificate(mtls_server: BackgroundServer, pki: Pki) -> None:
    channel_args = [
        ("grpc.max_send_message_length", 1 << 26),
        ("grpc.max_receive_message_length", 1 << 26),
        ("grpc.ssl_target_name_override", RENAMED_SERVER),
    ]
    with grpcclient.InferenceServerClient(
        mtls_server.address, ssl=True, root_certificates=pki.ca,
        private_key=pki.client.key, certificate_chain=pki.client.cert, channel_args=channel_args,
    ) as triton:
        assert triton.is_server_ready()
        model = mtls_server.state.served_model_name
        result = triton.infer(model, _text_input("Hi"), parameters=GREEDY)
        assert result.as_numpy("text_output") is not None
    with grpcclient.InferenceServerClient(
        mtls_server.address, ssl=True, root_certificates=pki.ca, channel_args=channel_args
    ) as anonymous:
        with pytest.raises(InferenceServerException) as refused:
            anonymous.is_server_ready()
    assert refused.value.status() == "StatusCode.UNAVAILABLE"


# ---- the metrics endpoint ---------------------------------------------------------------------


def scrape(
    server: BackgroundServer,
    *,
    https: bool,
    context: ssl.SSLContext | None = None,
    token: str | None = None,
) -> tuple[int, dict[str, str], str]:
    port = server.state.telemetry.metrics_port
    url = f"{'https' if https else 'http'}://127.0.0.1:{port}/metrics"
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=CALL_TIMEOUT_S, context=context) as reply:
            return reply.status, dict(reply.headers), reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()


def _client_context(pki: Pki, *, check_hostname: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca)
    context.check_hostname = check_hostname
    return context


def test_metrics_behind_the_key_answer_401_without_it(
    tls_server: BackgroundServer, pki: Pki
) -> None:
    context = _client_context(pki)
    for token in (None, OTHER_KEY, KEY[:-1]):
        status, headers, body = scrape(tls_server, https=True, context=context, token=token)
        assert status == 401, token
        assert headers["WWW-Authenticate"].startswith("Bearer")
        assert KEY[:8] not in body
    status, _, body = scrape(tls_server, https=True, context=context, token=KEY)
    assert status == 200
    assert "pagedserve_" in body


def test_metrics_over_https_need_the_ca(tls_server: BackgroundServer, pki: Pki) -> None:
    with pytest.raises(urllib.error.URLError) as untrusted:
        scrape(tls_server, https=True, context=ssl.create_default_context(), token=KEY)
    assert isinstance(untrusted.value.reason, ssl.SSLCertVerificationError)
    # Plain HTTP to the HTTPS port: the server hangs up.
    with pytest.raises((ConnectionError, urllib.error.URLError, http.client.HTTPException)):
        scrape(tls_server, https=False, token=KEY)


def test_metrics_stay_open_by_default(key_server: BackgroundServer) -> None:
    status, _, body = scrape(key_server, https=False)
    assert status == 200 and "pagedserve_" in body


def test_metrics_under_mtls_want_a_client_certificate(
    mtls_server: BackgroundServer, pki: Pki
) -> None:
    # The certificate names pagedserve.internal, dialled as 127.0.0.1: the chain is checked.
    anonymous = _client_context(pki, check_hostname=False)
    with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
        scrape(mtls_server, https=True, context=anonymous)
    with_certificate = _client_context(pki, check_hostname=False)
    with_certificate.load_cert_chain(pki.client.cert, pki.client.key)
    status, _, body = scrape(mtls_server, https=True, context=with_certificate)
    assert status == 200 and "pagedserve_" in body
