"""Every bad field is a 400 in OpenAI's error shape whose message and ``param`` name it; an
unknown model is a 404; a full queue a 429; a loading server a 503; aiohttp's own refusals
(unknown path, wrong method, bad JSON) come in the same shape."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from pagedserve.backend.config import EngineConfig, ServerConfig, TelemetryConfig
from pagedserve.backend.server.server import BackgroundServer
from tests.backend.server.harness import (
    READY_TIMEOUT_S,
    TINY_ENGINE,
    gated_model_loading,
    running_server,
)
from tests.backend.server.test_openai.conftest import CALL_TIMEOUT_S, openai_client

TOO_MANY_STOPS = [f"s{i}" for i in range(17)]  # the default limit is 16 (--max-stop-strings)

# (the field the error must name, the request's fields) for /v1/completions.
BAD_COMPLETIONS: list[tuple[str, dict[str, Any]]] = [
    ("prompt", {"prompt": 5}),
    ("prompt", {"prompt": ""}),
    ("prompt", {"prompt": []}),
    ("prompt", {"prompt": [1, "a"]}),
    ("prompt", {"prompt": [10**9]}),  # a token id outside the vocabulary
    ("prompt", {"prompt": "word " * 2000}),  # longer than the model's context
    ("max_tokens", {"max_tokens": 0}),
    ("max_tokens", {"max_tokens": "8"}),
    ("max_tokens", {"max_tokens": 10**6}),  # beyond the context
    ("temperature", {"temperature": -0.5}),
    ("temperature", {"temperature": "hot"}),
    ("top_p", {"top_p": 0}),
    ("top_p", {"top_p": 1.5}),
    ("n", {"n": 0}),
    ("n", {"n": 1000}),
    ("n", {"n": 1.5}),
    ("stop", {"stop": 5}),
    ("stop", {"stop": [""]}),
    ("stop", {"stop": TOO_MANY_STOPS}),
    ("stop", {"stop": ["x" * 300]}),  # longer than --max-stop-string-chars
    ("seed", {"seed": -1}),
    ("seed", {"seed": "x"}),
    ("presence_penalty", {"presence_penalty": 3}),
    ("frequency_penalty", {"frequency_penalty": -3}),
    ("logprobs", {"logprobs": 21}),
    ("logprobs", {"logprobs": True}),
    ("echo", {"echo": "yes"}),
    ("echo", {"echo": True, "logprobs": 1}),  # prompt logprobs are not computed
    ("logit_bias", {"logit_bias": {"999999999": 1}}),
    ("logit_bias", {"logit_bias": {"5": 101}}),
    ("logit_bias", {"logit_bias": {"five": 1}}),
    ("logit_bias", {"logit_bias": [1]}),
    ("user", {"user": 5}),
    ("top_k", {"top_k": 0}),
    ("min_p", {"min_p": 2}),
    ("repetition_penalty", {"repetition_penalty": 0}),
    ("ignore_eos", {"ignore_eos": "no"}),
    ("min_tokens", {"min_tokens": -1}),
    ("min_tokens", {"min_tokens": 9, "max_tokens": 4}),
    ("skip_special_tokens", {"skip_special_tokens": 1}),
    ("stream", {"stream": "yes"}),
    ("stream_options", {"stream_options": {"include_usage": True}}),  # without stream
    ("stream_options.include_usage", {"stream": True, "stream_options": {"include_usage": 1}}),
    ("stream_options.continuous", {"stream": True, "stream_options": {"continuous": True}}),
    ("best_of", {"best_of": 3}),
    ("suffix", {"suffix": "and so on"}),
    ("max_completion_tokens", {"max_completion_tokens": 5}),  # a chat field
    ("messages", {"messages": []}),
    ("bogus_field", {"bogus_field": 1}),
]

USER = [{"role": "user", "content": "Hi"}]
# (the field the error must name, the request's fields) for /v1/chat/completions.
BAD_CHATS: list[tuple[str, dict[str, Any]]] = [
    ("messages", {"messages": []}),
    ("messages", {"messages": "Hi"}),
    ("messages[0]", {"messages": ["Hi"]}),
    ("messages[0].role", {"messages": [{"role": "tool", "content": "42"}]}),
    ("messages[0].role", {"messages": [{"content": "Hi"}]}),
    ("messages[1].content", {"messages": [*USER, {"role": "assistant"}]}),
    ("messages[0].content", {"messages": [{"role": "user", "content": 5}]}),
    (
        "messages[0].content[1].type",
        {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "Look:"},
            {"type": "image_url", "image_url": {"url": "http://example.invalid/cat.png"}},
        ]}]},
    ),
    (
        "messages[0].content[0].text",
        {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
    ),
    ("messages[0].name", {"messages": [{"role": "user", "content": "Hi", "name": 3}]}),
    (
        "messages[0].tool_calls",
        {"messages": [{"role": "user", "content": "Hi", "tool_calls": [{}]}]},
    ),
    ("messages[0].weight", {"messages": [{"role": "user", "content": "Hi", "weight": 1}]}),
    ("messages", {"messages": [{"role": "user", "content": "word " * 2000}]}),  # beyond context
    ("max_completion_tokens", {"max_completion_tokens": 0}),
    ("max_completion_tokens", {"max_completion_tokens": 10**6}),
    ("max_completion_tokens", {"max_completion_tokens": 5, "max_tokens": 6}),
    ("max_tokens", {"max_tokens": -2}),
    ("logprobs", {"logprobs": 3}),
    ("top_logprobs", {"logprobs": True, "top_logprobs": 21}),
    ("top_logprobs", {"top_logprobs": 2}),  # needs logprobs
    ("add_generation_prompt", {"add_generation_prompt": "no"}),
    ("continue_final_message", {"continue_final_message": True, "add_generation_prompt": False}),
    (
        "continue_final_message",
        {"continue_final_message": True,
         "messages": [*USER, {"role": "assistant", "content": "Hel"}]},
    ),
    ("tools", {"tools": [{"type": "function", "function": {"name": "f"}}]}),
    ("tool_choice", {"tool_choice": "required"}),
    ("response_format", {"response_format": {"type": "json_object"}}),
    ("temperature", {"temperature": -1}),
    ("n", {"n": 0}),
    ("stop", {"stop": TOO_MANY_STOPS}),
    ("logit_bias", {"logit_bias": {"3": -101}}),
    ("seed", {"seed": 2**63}),
    ("echo", {"echo": True}),  # a completions field
    ("prompt", {"prompt": "Hi"}),
]


def _bad_request(call: Any) -> dict[str, Any]:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    assert info.value.status_code == 400
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "invalid_request_error"
    return body


@pytest.mark.parametrize(("field", "fields"), BAD_COMPLETIONS, ids=lambda v: str(v)[:60])
def test_a_bad_completions_field_is_a_400_naming_it(
    oai: openai.OpenAI, model: str, field: str, fields: dict[str, Any]
) -> None:
    body = _bad_request(
        lambda: oai.completions.create(model=model, prompt="Hi", max_tokens=2, extra_body=fields)
    )
    assert body["param"] == field
    assert field in body["message"], body["message"]


@pytest.mark.parametrize(("field", "fields"), BAD_CHATS, ids=lambda v: str(v)[:60])
def test_a_bad_chat_field_is_a_400_naming_it(
    oai: openai.OpenAI, model: str, field: str, fields: dict[str, Any]
) -> None:
    body = _bad_request(
        lambda: oai.chat.completions.create(
            model=model, messages=USER, max_tokens=2, extra_body=fields
        )
    )
    assert body["param"] == field
    assert field in body["message"], body["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_streamed_request_is_refused_before_its_stream(
    oai: openai.OpenAI, model: str, stream: bool
) -> None:
    body = _bad_request(
        lambda: oai.completions.create(model=model, prompt="Hi", stream=stream, temperature=-1)
    )
    assert body["param"] == "temperature"


def test_fields_that_ask_for_nothing_are_taken(oai: openai.OpenAI, model: str) -> None:
    response = oai.chat.completions.create(
        model=model, messages=USER, max_tokens=2, tools=[], tool_choice="none",
        response_format={"type": "text"}, store=False, user="someone", n=None,
    )
    assert response.choices[0].finish_reason in ("stop", "length")
    completion = oai.completions.create(model=model, prompt="Hi", max_tokens=2, best_of=1)
    assert completion.choices


def test_an_unknown_model_is_a_404(oai: openai.OpenAI, model: str) -> None:
    for call in (
        lambda: oai.completions.create(model="gpt-4", prompt="Hi", max_tokens=2),
        lambda: oai.chat.completions.create(model="gpt-4", messages=USER, max_tokens=2),
        lambda: oai.models.retrieve("gpt-4"),
    ):
        with pytest.raises(openai.NotFoundError) as info:
            call()
        body = info.value.body
        assert isinstance(body, dict)
        assert body["code"] == "model_not_found" and body["param"] == "model"
        assert "gpt-4" in body["message"] and model in body["message"]


def test_models_lists_the_served_model(oai: openai.OpenAI, model: str, tiny_server: Any) -> None:
    (card,) = oai.models.list().data
    assert card.id == model and card.object == "model" and card.owned_by == "pagedserve"
    assert card.model_extra["max_model_len"] == tiny_server.state.engine.model_info.max_model_len
    assert oai.models.retrieve(model).id == model


def _raw(
    server: BackgroundServer, method: str, path: str, body: bytes | None = None
) -> tuple[int, dict[str, Any]]:
    host, port = server.http_address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=CALL_TIMEOUT_S)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", "body"),
        (b"\xff\xfe\x00", "body"),
        (b"[1, 2]", "body"),
        (b'{"prompt": "Hi"}', "model"),
        (b'{"model": 5, "prompt": "Hi"}', "model"),
    ],
)
def test_a_body_that_is_not_a_request_is_a_400(
    tiny_server: BackgroundServer, body: bytes, param: str
) -> None:
    status, answer = _raw(tiny_server, "POST", "/v1/completions", body)
    assert status == 400
    assert answer["error"]["param"] == param and param in answer["error"]["message"]


def test_aiohttps_refusals_come_in_openai_shape(tiny_server: BackgroundServer) -> None:
    status, answer = _raw(tiny_server, "GET", "/v1/embeddings")
    assert status == 404 and answer["error"]["type"] == "invalid_request_error"
    status, answer = _raw(tiny_server, "GET", "/v1/completions")
    assert status == 405 and "GET" in answer["error"]["message"]
    status, answer = _raw(tiny_server, "POST", "/v1/completions", b"x" * (17 * 1024 * 1024))
    assert status == 413 and answer["error"]["type"] == "invalid_request_error"


@pytest.fixture(scope="module")
def no_queue_server(tiny_llama_dir: Path) -> Iterator[BackgroundServer]:
    """Every request finds the waiting queue full (no warm-up: it would be refused too)."""
    with running_server(
        tiny_llama_dir, warmup=False, **{**TINY_ENGINE, "max_queued_requests": 0}
    ) as server:
        yield server


def test_a_full_queue_is_a_429(no_queue_server: BackgroundServer) -> None:
    with openai_client(no_queue_server) as oai:
        model = no_queue_server.state.served_model_name
        with pytest.raises(openai.RateLimitError) as info:
            oai.completions.create(model=model, prompt="Hi", max_tokens=2)
        assert "queue is full" in info.value.body["message"]
        with pytest.raises(openai.RateLimitError):  # all n choices or none
            oai.chat.completions.create(model=model, messages=USER, max_tokens=2, n=2)
        assert no_queue_server.state.engine.get_load().num_waiting == 0


def test_a_loading_server_answers_503_and_health_follows(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with gated_model_loading(monkeypatch, READY_TIMEOUT_S) as gate:
        server = BackgroundServer(
            ServerConfig(host="127.0.0.1", port=0, http_port=0,
                         telemetry=TelemetryConfig(metrics_port=None)),
            EngineConfig.from_kwargs(model=str(tiny_llama_dir), **TINY_ENGINE),
        )
        server.start()
        try:
            status, answer = _raw(server, "GET", "/health")
            assert status == 503 and answer["error"]["message"] == "model is loading"
            with openai_client(server) as oai:
                with pytest.raises(openai.InternalServerError) as info:
                    oai.completions.create(model="any", prompt="Hi", max_tokens=2)
                assert info.value.status_code == 503
                assert info.value.body["message"] == "model is loading"
                gate.set()
                server.wait_ready(READY_TIMEOUT_S)
                assert _raw(server, "GET", "/health") == (200, {"status": "ok"})
                model = server.state.served_model_name
                assert oai.completions.create(model=model, prompt="Hi", max_tokens=2).choices
        finally:
            server.stop()
