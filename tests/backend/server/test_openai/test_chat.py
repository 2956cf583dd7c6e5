"""/v1/chat/completions with the openai client: the chat template's turns, greedy text equal to
the gRPC API's, streaming, usage, logprobs, n, add_generation_prompt and
continue_final_message."""

from __future__ import annotations

from typing import Any

import openai

from pagedserve.clients.client import GenerationClient

MESSAGES = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
]
MAX_TOKENS = 10
NO_EOS = {"ignore_eos": True}


def _chat(oai: openai.OpenAI, model: str, **kwargs: Any) -> Any:
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    extra = {**NO_EOS, **kwargs.pop("extra_body", {})}
    return oai.chat.completions.create(
        model=model, messages=kwargs.pop("messages", MESSAGES), extra_body=extra, **kwargs
    )


def _template_length(tokenizer: Any, messages: list[dict[str, str]], **options: Any) -> int:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, **options)
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_greedy_chat_equals_the_grpc_apis(
    oai: openai.OpenAI, client: GenerationClient, model: str, tokenizer: Any
) -> None:
    response = _chat(oai, model, temperature=0)
    native = client.complete(
        messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True
    )
    assert response.object == "chat.completion" and response.model == model
    (choice,) = response.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == native.text and native.text
    assert choice.finish_reason == "length"
    expected = _template_length(tokenizer, MESSAGES, add_generation_prompt=True)
    assert response.usage.prompt_tokens == expected == native.usage.prompt_tokens
    assert response.usage.completion_tokens == MAX_TOKENS


def test_a_chat_stream_opens_with_the_role_and_ends_with_usage(
    oai: openai.OpenAI, model: str
) -> None:
    whole = _chat(oai, model, temperature=0)
    chunks = list(
        _chat(oai, model, temperature=0, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    *text_chunks, last = chunks
    assert last.choices == [] and last.usage.model_dump() == whole.usage.model_dump()
    content = "".join(c.choices[0].delta.content or "" for c in text_chunks)
    assert content == whole.choices[0].message.content
    assert text_chunks[-1].choices[0].finish_reason == "length"


def test_chat_logprobs_in_openai_shape(oai: openai.OpenAI, model: str) -> None:
    response = _chat(oai, model, temperature=0, logprobs=True, top_logprobs=3)
    content = response.choices[0].logprobs.content
    assert len(content) == MAX_TOKENS
    for entry in content:
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == entry.top_logprobs[0].logprob  # greedy: the top token
        assert entry.token == entry.top_logprobs[0].token
    # logprobs alone: the chosen token's, no alternatives.
    bare = _chat(oai, model, temperature=0, logprobs=True, max_tokens=3)
    assert [e.top_logprobs for e in bare.choices[0].logprobs.content] == [[], [], []]
    assert _chat(oai, model, max_tokens=2).choices[0].logprobs is None


def test_content_parts_read_as_the_same_text(oai: openai.OpenAI, model: str) -> None:
    as_parts = [
        {"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in MESSAGES
    ]
    assert (
        _chat(oai, model, temperature=0, messages=as_parts).choices[0].message.content
        == _chat(oai, model, temperature=0).choices[0].message.content
    )


def test_chat_n_choices(oai: openai.OpenAI, model: str) -> None:
    sampled = _chat(oai, model, n=3, temperature=1.0, seed=3)
    assert len({c.message.content for c in sampled.choices}) == 3
    greedy = _chat(oai, model, n=2, temperature=0)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content


def test_add_generation_prompt_and_continue_final_message(
    oai: openai.OpenAI, model: str, tokenizer: Any
) -> None:
    without = _chat(oai, model, max_tokens=1, extra_body={"add_generation_prompt": False})
    assert without.usage.prompt_tokens == _template_length(
        tokenizer, MESSAGES, add_generation_prompt=False
    )
    started = [*MESSAGES, {"role": "assistant", "content": "Red, or maybe"}]
    options = {"add_generation_prompt": False, "continue_final_message": True}
    continued = _chat(oai, model, max_tokens=1, messages=started, extra_body=options)
    assert continued.usage.prompt_tokens == _template_length(
        tokenizer, started, add_generation_prompt=False, continue_final_message=True
    )
    # The open turn is not closed: fewer tokens than the same turn ended.
    closed = _template_length(tokenizer, started, add_generation_prompt=False)
    assert continued.usage.prompt_tokens < closed


def test_without_max_tokens_chat_runs_to_the_end_of_the_context(
    oai: openai.OpenAI, model: str, tokenizer: Any, tiny_server: Any
) -> None:
    """OpenAI's chat default: no limit but the room the context leaves."""
    context = tiny_server.state.engine.model_info.max_model_len
    words = 1
    messages = [{"role": "user", "content": "hello"}]
    while _template_length(tokenizer, messages, add_generation_prompt=True) < context - 20:
        words += 5
        messages = [{"role": "user", "content": " ".join(["hello"] * words)}]
    response = oai.chat.completions.create(
        model=model, messages=messages, temperature=0, extra_body=NO_EOS
    )
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == context - response.usage.prompt_tokens > 16
