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
_DATA_SPACE = b"data: "
# An error body's text kept in the report when it is not OpenAI's error shape.
_ERROR_TEXT_CHARS = 200
_NULL_USAGE_END = b',"usage":null}'
_ERROR_START = b'{"error"'
_NO_CHOICES = b'"choices":[]'


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


def _event_data(event: bytes) -> bytes | None:
    if event.startswith(_DATA_SPACE) and b"\n" not in event:
        return event[len(_DATA_SPACE):]  # the usual event: one data line
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


@dataclass(frozen=True)
class Chunk:
    """What one streamed chunk tells the measurement."""

    has_choices: bool  # a message of the stream: it carries a choice's delta
    completion_tokens: int | None = None  # the usage chunk's count
    error: str | None = None  # an error event's type and message


_CHOICE_CHUNK = Chunk(has_choices=True)
_NO_CHOICE_CHUNK = Chunk(has_choices=False)


def read_chunk(payload: bytes) -> Chunk:
    """One chunk's JSON, read in full only where it can hold usage or an error.

    A token chunk is by far the most common, and under load the client parses tens of
    thousands a second: in compact JSON (as pagedserve writes it) it ends with its null usage,
    and its choices are empty only if ``"choices":[]`` appears (neither can occur inside a JSON
    string, where every quote is escaped). Anything else is parsed.
    """
    if payload.endswith(_NULL_USAGE_END) and not payload.startswith(_ERROR_START):
        return _NO_CHOICE_CHUNK if _NO_CHOICES in payload else _CHOICE_CHUNK
    try:
        chunk = json.loads(payload)
        message = _error_message(chunk)
        if message is not None:
            return Chunk(has_choices=False, error=f"in-stream error: {message}")
        usage = chunk.get("usage")
        tokens = None if usage is None else int(usage["completion_tokens"])
        return Chunk(has_choices=bool(chunk.get("choices")), completion_tokens=tokens)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"stream: malformed chunk {payload[:_ERROR_TEXT_CHARS]!r}") from None


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
                if error is not None:
                    return error
                if completion_tokens is None:
                    return "stream: no usage chunk before data: [DONE]"
                record.output_tokens = completion_tokens
                return None
            try:
                chunk = read_chunk(payload)
            except ValueError as malformed:
                return str(malformed)
            error = chunk.error or error
            if chunk.completion_tokens is not None:
                completion_tokens = chunk.completion_tokens
            if chunk.has_choices:
                if record.ttft is None:
                    record.ttft = now - start
                else:
                    record.itls.append(now - last)
                last = now
    return error or "stream: ended without data: [DONE]"
