"""The three APIs on one server at once: 16 streams each of the native gRPC API, KServe v2's
ModelStreamInfer and the OpenAI API (chat and completions), all finishing without an error and
with the greedy text every API gives for the same prompt."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import openai
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio

from pagedserve.backend.server.server import BackgroundServer
from pagedserve.clients.client import AsyncGenerationClient, GenerationClient
from tests.backend.server.harness import all_blocks_free, wait_for
from tests.backend.server.test_openai.conftest import CALL_TIMEOUT_S, base_url

STREAMS = 16
MAX_TOKENS = 8
PROMPTS = [f"Story {i}: once upon a time" for i in range(STREAMS)]
FREE_TIMEOUT_S = 10.0


async def _native(client: AsyncGenerationClient, prompt: str) -> str:
    pieces = [
        r.text
        async for r in client.generate(
            prompt, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True
        )
    ]
    return "".join(pieces)


def _kserve_inputs(prompt: str) -> list[grpcclient.InferInput]:
    text = grpcclient.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    stream = grpcclient.InferInput("stream", [1], "BOOL")
    stream.set_data_from_numpy(np.array([True]))
    return [text, stream]


async def _kserve(client: grpcclient_aio.InferenceServerClient, model: str, prompt: str) -> str:
    async def requests() -> AsyncIterator[dict[str, Any]]:
        yield {
            "model_name": model,
            "inputs": _kserve_inputs(prompt),
            "request_id": "one",
            "parameters": {"temperature": 0, "max_tokens": MAX_TOKENS, "ignore_eos": True},
        }

    text = ""
    async for result, error in client.stream_infer(requests(), stream_timeout=CALL_TIMEOUT_S):
        assert error is None, error
        text += result.as_numpy("text_output")[0].decode()
    return text


async def _completion(client: openai.AsyncOpenAI, model: str, prompt: str) -> str:
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )
    return "".join([chunk.choices[0].text async for chunk in stream])


async def _chat(client: openai.AsyncOpenAI, model: str, prompt: str) -> tuple[str, str]:
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=MAX_TOKENS,
        temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    text, finish = "", ""
    async for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish


async def test_three_apis_16_streams_each_at_once(
    tiny_server: BackgroundServer, client: GenerationClient
) -> None:
    model = tiny_server.state.served_model_name
    async with AsyncGenerationClient(tiny_server.address) as native:
        triton = grpcclient_aio.InferenceServerClient(tiny_server.address)
        oai = openai.AsyncOpenAI(
            base_url=base_url(tiny_server), api_key="unused", max_retries=0,
            timeout=CALL_TIMEOUT_S,
        )
        try:
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(_native(native, p) for p in PROMPTS),
                    *(_kserve(triton, model, p) for p in PROMPTS),
                    *(_completion(oai, model, p) for p in PROMPTS),
                    *(_chat(oai, model, p) for p in PROMPTS),
                ),
                timeout=4 * CALL_TIMEOUT_S,
            )
        finally:
            await oai.close()
            await triton.close()
    native_texts = results[:STREAMS]
    kserve_texts = results[STREAMS : 2 * STREAMS]
    completion_texts = results[2 * STREAMS : 3 * STREAMS]
    chats = results[3 * STREAMS :]
    assert all(native_texts)
    assert kserve_texts == native_texts
    assert completion_texts == native_texts
    assert all(text and finish == "length" for text, finish in chats)
    wait_for(lambda: all_blocks_free(client), FREE_TIMEOUT_S, "every request's blocks freed")
