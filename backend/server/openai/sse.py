"""Server-sent events as OpenAI streams them: ``data: <json>`` per chunk, ``data: [DONE]`` last.

Each write waits for the transport to drain (aiohttp's ``write``), so a client that reads
slowly slows its own stream only, and the engine's mailbox merges the deltas it has not taken
meanwhile. A write to a client that has gone raises ``ConnectionError``; the handler's cleanup
then aborts its engine requests.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

_DONE = b"data: [DONE]\n\n"
HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    # Proxies that buffer (nginx) would hold the tokens back.
    "X-Accel-Buffering": "no",
}


def encode(payload: dict[str, Any]) -> bytes:
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + text.encode() + b"\n\n"


async def open_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers=HEADERS)
    await response.prepare(request)
    return response


async def send(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    await response.write(encode(payload))


async def finish(response: web.StreamResponse) -> None:
    await response.write(_DONE)
    await response.write_eof()
