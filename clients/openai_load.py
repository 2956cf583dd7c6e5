"""``bench serve --api openai``: the load generator's requests over the OpenAI-compatible API.

Each request streams ``POST /v1/completions`` with a token-id prompt (so its length is exact,
as on gRPC), greedy, ``max_tokens`` and ``ignore_eos`` as the gRPC path sends them, and
``stream_options.include_usage``: the usage chunk's ``completion_tokens`` is the exact count
of output tokens (a chunk carries text, which says nothing reliable about how many tokens made
it). Every chunk that carries a choice is one message of the stream, as a gRPC response is one:
TTFT is the first, ITL the gaps between them.

One aiohttp session holds the keep-alive connections (no pool limit: the load pattern's
concurrency cap is the only one, as on gRPC's one channel; no total timeout: gRPC's calls have
no deadline either). A request fails, and its record says how, on an HTTP status other than
200 (with the OpenAI error's message), an error event inside the stream, a stream that ends
without ``data: [DONE]`` or without usage, and a connection that drops or is refused.
"""

from __future__ import annotations

import json
import ssl
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aiohttp

from pagedserve.clients.load_record import RequestRecord
from pagedserve.clients.security import ChannelSecurity

COMPLETIONS_PATH = "/v1/completions"
_DONE = b"[DONE]"
_DATA = b"data:"
# An error body's text kept in the report when it is not OpenAI's error shape.
_ERROR_TEXT_CHARS = 200


class SseDecoder:
    """Server-sent events from the bytes of a stream, as they arrive in arbitrary pieces:
    each complete event's ``data`` (its data lines joined by newlines)."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[bytes]:
        text = self._pending + data
        # A CR at the end may be the first half of a CRLF: it waits for the next piece.
        held = b"\r" if text.endswith(b"\r") else b""
        text = text[: len(text) - len(held)]
        if b"\r" in text:
            text = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *events, rest = text.split(b"\n\n")
        self._pending = rest + held
        return [payload for event in events if (payload := _event_data(event)) is not None]

    @property
    def pending(self) -> bool:
        """Bytes of an event not yet ended by a blank line."""
        return bool(self._pending.strip())


def _event_data(event: bytes) -> bytes | None:
    lines = [line[len(_DATA):] for line in event.split(b"\n") if line.startswith(_DATA)]
    if not lines:
        return None  # a comment or a field other than data
    return b"\n".join(line[1:] if line.startswith(b" ") else line for line in lines)


def _error_message(body: Any) -> str | None:
    """The message of OpenAI's error shape ``{"error": {"message", "type", ...}}``."""
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        return None
    error = body["error"]
    kind = error.get("type")
    message = error.get("message")
    return f"{kind}: {message}" if kind else str(message)


def ssl_context(security: ChannelSecurity) -> ssl.SSLContext | None:
    """The client's TLS for HTTPS from the same flags as gRPC's (None: plain HTTP)."""
    if not security.tls:
        return None
    try:
        context = ssl.create_default_context(cafile=security.ssl_ca_certs)
        if security.ssl_certfile is not None:
            context.load_cert_chain(security.ssl_certfile, security.ssl_keyfile)
    except (OSError, ssl.SSLError) as error:
        raise ValueError(f"cannot load the TLS files: {error}") from None
    return context


@dataclass(frozen=True)
class CompletionsTarget:
    """Where and how the requests go: ``address`` is the HTTP API's ``host:port``."""

    address: str
    model: str
    security: ChannelSecurity = ChannelSecurity()

    @property
    def url(self) -> str:
        scheme = "https" if self.security.tls else "http"
        return f"{scheme}://{self.address}{COMPLETIONS_PATH}"

    @property
    def headers(self) -> dict[str, str]:
        return dict(self.security.metadata())  # the API key as "authorization: Bearer <key>"


class OpenAICompletions:
    """Streamed completions over one session's keep-alive connections."""

    def __init__(self, target: CompletionsTarget) -> None:
        self._target = target
        self._url = target.url
        self._ssl = ssl_context(target.security)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> OpenAICompletions:
        connector = aiohttp.TCPConnector(limit=0, ssl=self._ssl if self._ssl else True)
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=self._target.headers,
            timeout=aiohttp.ClientTimeout(total=None),
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def body(self, prompt: list[int], max_tokens: int, ignore_eos: bool) -> dict[str, Any]:
        return {
            "model": self._target.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": ignore_eos,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    async def request(self, prompt: list[int], max_tokens: int, ignore_eos: bool) -> RequestRecord:
        """One streamed completion, measured; a failure is in the record, never raised."""
        assert self._session is not None, "use OpenAICompletions as an async context manager"
        record = RequestRecord(prompt_tokens=len(prompt), cached_prompt_tokens=None)
        start = time.perf_counter()
        try:
            async with self._session.post(
                self._url,
                json=self.body(prompt, max_tokens, ignore_eos),
                server_hostname=self._target.security.ssl_server_name,
            ) as response:
                if response.status != 200:
                    record.error = await _status_error(response)
                    return record
                record.error = await _read_stream(response, record, start)
        except aiohttp.ClientError as error:
            record.error = f"connection: {type(error).__name__}: {error}"
        if record.error is None:
            record.latency = time.perf_counter() - start
        return record


async def _status_error(response: aiohttp.ClientResponse) -> str:
    text = await response.text(errors="replace")
    try:
        message = _error_message(json.loads(text))
    except ValueError:
        message = None
    return f"HTTP {response.status}: {message or text[:_ERROR_TEXT_CHARS]}"


async def _read_stream(
    response: aiohttp.ClientResponse, record: RequestRecord, start: float
) -> str | None:
    """Fill ``record`` from the stream; returns the failure, if the stream had one."""
    decoder = SseDecoder()
    last = start
    completion_tokens: int | None = None
    error: str | None = None
    async for data in response.content.iter_any():
        now = time.perf_counter()
        for payload in decoder.feed(data):
            if payload == _DONE:
                if decoder.pending:
                    return "stream: bytes after data: [DONE]"
                if error is not None:
                    return error
                if completion_tokens is None:
                    return "stream: no usage chunk before data: [DONE]"
                record.output_tokens = completion_tokens
                return None
            try:
                chunk = json.loads(payload)
                message = _error_message(chunk)
                usage = chunk.get("usage")
                if usage is not None:
                    completion_tokens = int(usage["completion_tokens"])
            except (ValueError, KeyError, TypeError, AttributeError):
                return f"stream: malformed chunk {payload[:_ERROR_TEXT_CHARS]!r}"
            if message is not None:
                error = f"in-stream error: {message}"
                continue
            if chunk.get("choices"):
                if record.ttft is None:
                    record.ttft = now - start
                else:
                    record.itls.append(now - last)
                last = now
    return error or "stream: ended without data: [DONE]"
