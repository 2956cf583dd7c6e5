"""Streaming clients for ``pagedserve.v1.GenerationService``: sync and asyncio.

Pure gRPC and protobuf (no torch), so they install and import anywhere::

    from pagedserve.clients.client import GenerationClient

    with GenerationClient("127.0.0.1:8001") as client:
        for piece in client.generate_text("The capital of France is", max_tokens=16):
            print(piece, end="", flush=True)

Sampling and stopping options are the request's field names (``temperature``, ``max_tokens``,
``stop`` ...); anything left out is the server's default.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from typing import Any, Protocol, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.trace import TracerProvider

from pagedserve.clients.security import ChannelSecurity
from pagedserve.clients.tracing import ClientTracing, TracedStream, end_span
from pagedserve.v1 import generation_pb2 as pb
from pagedserve.v1 import generation_pb2_grpc as pb_grpc

# Match the server's large message limit; gRPC's client default (4 MiB) is too small for
# long token-id prompts with logprobs.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)
_HEALTH_POLL_S = 0.1

Message = Mapping[str, str] | tuple[str, str]


# What grpc_health's HealthStub holds (its published stubs declare the class without methods).
class _HealthStub(Protocol):
    Check: grpc.UnaryUnaryMultiCallable[
        health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
    ]


class _AsyncHealthStub(Protocol):
    Check: grpc.aio.UnaryUnaryMultiCallable[
        health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
    ]


_INPUT_FIELDS = frozenset({"prompt", "prompt_token_ids", "messages"})
_PARAM_FIELDS = frozenset(
    f.name for f in pb.GenerateRequest.DESCRIPTOR.fields if f.name not in _INPUT_FIELDS
)


def build_request(
    prompt: str | None = None,
    *,
    prompt_token_ids: Iterable[int] | None = None,
    messages: Iterable[Message] | None = None,
    **fields: Any,
) -> pb.GenerateRequest:
    """A GenerateRequest from exactly one input and any request fields by name."""
    given = [x is not None for x in (prompt, prompt_token_ids, messages)]
    if sum(given) != 1:
        raise ValueError("give exactly one of prompt, prompt_token_ids, messages")
    unknown = set(fields) - _PARAM_FIELDS
    if unknown:
        raise TypeError(f"unknown GenerateRequest fields: {sorted(unknown)}")
    request = pb.GenerateRequest(**{k: v for k, v in fields.items() if v is not None})
    if prompt is not None:
        request.prompt = prompt
    elif prompt_token_ids is not None:
        request.prompt_token_ids.ids.extend(prompt_token_ids)
    else:
        assert messages is not None
        chat = request.messages.messages
        for message in messages:
            role, content = (
                (message["role"], message["content"])
                if isinstance(message, Mapping)
                else message
            )
            chat.add(role=role, content=content)
    return request


# How gRPC words a TLS handshake this side refused: an untrusted certificate or a plaintext
# server, and a certificate issued to another name.
_REFUSED_HANDSHAKE = ("handshake failed", "verification check failed")


def handshake_failed(error: grpc.RpcError) -> bool:
    """UNAVAILABLE because this side refused the TLS handshake (a server's refusal reads as a
    closed socket, like a server going away)."""
    code, details = getattr(error, "code", None), getattr(error, "details", None)
    if not callable(code) or not callable(details):
        return False
    text = (details() or "").lower()
    return code() == grpc.StatusCode.UNAVAILABLE and any(m in text for m in _REFUSED_HANDSHAKE)


class GenerationClient:
    """Blocking client. ``generate`` returns the gRPC call: iterate it, or ``.cancel()`` it.

    Each Generate/Complete gets a client span from ``tracer_provider`` (default: the global
    one) whose context travels to the server as ``traceparent``.

    A secured server: ``api_key`` goes with every call as ``authorization: Bearer <key>``;
    TLS is on with any ``ssl_*`` file (PEM): ``ssl_ca_certs`` to verify the server (default:
    gRPC's roots, or ``ssl=True`` alone), ``ssl_certfile``/``ssl_keyfile`` for mTLS, and
    ``ssl_server_name`` when the certificate names another host than ``target``'s.
    """

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        ssl: bool | None = None,
        ssl_ca_certs: str | None = None,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
        ssl_server_name: str | None = None,
        options: Iterable[tuple[str, Any]] = CHANNEL_OPTIONS,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.target = target
        self._tracing = ClientTracing(target, tracer_provider)
        security = ChannelSecurity(
            ssl, ssl_ca_certs, ssl_certfile, ssl_keyfile, ssl_server_name, api_key
        )
        self._channel = security.channel(target, options)
        self.stub = pb_grpc.GenerationServiceStub(self._channel)
        self._health = cast(_HealthStub, health_pb2_grpc.HealthStub(self._channel))

    def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> Iterator[pb.GenerateResponse]:
        request = build_request(prompt, **kwargs)
        span, metadata = self._tracing.start("Generate", request)
        call = self.stub.Generate(request, timeout=timeout, metadata=metadata)
        return TracedStream(call, span) if span.is_recording() else call

    def generate_text(self, prompt: str | None = None, **kwargs: Any) -> Iterator[str]:
        """Just the text, piece by piece as it is generated."""
        for response in self.generate(prompt, **kwargs):
            if response.text:
                yield response.text

    def complete(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> pb.GenerateResponse:
        request = build_request(prompt, **kwargs)
        span, metadata = self._tracing.start("Complete", request)
        try:
            response = self.stub.Complete(request, timeout=timeout, metadata=metadata)
        except grpc.RpcError as error:
            end_span(span, error.code(), error.details(), None)
            raise
        end_span(span, grpc.StatusCode.OK, None, response)
        return response

    def tokenize(self, text: str, *, add_special_tokens: bool = True, model: str = "") -> list[int]:
        request = pb.TokenizeRequest(text=text, model=model, add_special_tokens=add_special_tokens)
        return list(self.stub.Tokenize(request).token_ids)

    def model_info(self) -> pb.GetModelInfoResponse:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest())

    def load(self) -> pb.GetLoadResponse:
        return self.stub.GetLoad(pb.GetLoadRequest())

    def health(self, service: str = "") -> int:
        """The health status (``health_pb2.HealthCheckResponse.SERVING`` ...)."""
        return self._health.Check(health_pb2.HealthCheckRequest(service=service)).status

    def wait_until_serving(self, timeout_s: float = 300.0) -> None:
        """Block until health reports SERVING (the server may still be starting or loading).
        A TLS handshake this client refused (an untrusted or misnamed certificate, a plaintext
        server) raises at once: waiting would not mend it."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.health() == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or handshake_failed(error):
                    raise
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.target} not SERVING after {timeout_s} s")
            time.sleep(_HEALTH_POLL_S)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> GenerationClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncGenerationClient:
    """asyncio client. ``generate`` returns the call: ``async for`` it, or ``.cancel()`` it.
    Traced and secured as ``GenerationClient`` is."""

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        ssl: bool | None = None,
        ssl_ca_certs: str | None = None,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
        ssl_server_name: str | None = None,
        options: Iterable[tuple[str, Any]] = CHANNEL_OPTIONS,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.target = target
        self._tracing = ClientTracing(target, tracer_provider)
        security = ChannelSecurity(
            ssl, ssl_ca_certs, ssl_certfile, ssl_keyfile, ssl_server_name, api_key
        )
        self._channel = security.aio_channel(target, options)
        self.stub = pb_grpc.GenerationServiceStub(self._channel)
        self._health = cast(_AsyncHealthStub, health_pb2_grpc.HealthStub(self._channel))

    def generate(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> grpc.aio.UnaryStreamCall:
        request = build_request(prompt, **kwargs)
        span, metadata = self._tracing.start("Generate", request)
        call = self.stub.Generate(request, timeout=timeout, metadata=metadata)
        # TracedStream stands in for the call: what it does not define is the call's (__getattr__).
        return TracedStream(call, span) if span.is_recording() else call  # type: ignore[return-value]

    async def generate_text(self, prompt: str | None = None, **kwargs: Any) -> AsyncIterator[str]:
        async for response in self.generate(prompt, **kwargs):
            if response.text:
                yield response.text

    async def complete(
        self, prompt: str | None = None, *, timeout: float | None = None, **kwargs: Any
    ) -> pb.GenerateResponse:
        request = build_request(prompt, **kwargs)
        span, metadata = self._tracing.start("Complete", request)
        try:
            response = await self.stub.Complete(request, timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as error:
            end_span(span, error.code(), error.details(), None)
            raise
        except asyncio.CancelledError:
            end_span(span, grpc.StatusCode.CANCELLED, "cancelled", None)
            raise
        end_span(span, grpc.StatusCode.OK, None, response)
        return response

    async def tokenize(
        self, text: str, *, add_special_tokens: bool = True, model: str = ""
    ) -> list[int]:
        request = pb.TokenizeRequest(text=text, model=model, add_special_tokens=add_special_tokens)
        return list((await self.stub.Tokenize(request)).token_ids)

    async def model_info(self) -> pb.GetModelInfoResponse:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest())

    async def load(self) -> pb.GetLoadResponse:
        return await self.stub.GetLoad(pb.GetLoadRequest())

    async def health(self, service: str = "") -> int:
        request = health_pb2.HealthCheckRequest(service=service)
        return (await self._health.Check(request)).status

    async def wait_until_serving(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if await self.health() == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or handshake_failed(error):
                    raise
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.target} not SERVING after {timeout_s} s")
            await asyncio.sleep(_HEALTH_POLL_S)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncGenerationClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
