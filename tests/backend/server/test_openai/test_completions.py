"""/v1/completions with the openai client: greedy text equal to the gRPC API's, streaming,
usage, n, seeds, logprobs, stop strings, echo, token-id and batched prompts, logit_bias."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from pagedserve.backend.config import RequestLimits
from pagedserve.clients.client import GenerationClient

PROMPT = "The quick brown fox"
MAX_TOKENS = 12
# Forces every token: the engine would otherwise stop at EOS, which the tiny model may pick.
NO_EOS = {"ignore_eos": True}


def _complete(oai: openai.OpenAI, model: str, **kwargs: Any) -> Any:
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    extra = {**NO_EOS, **kwargs.pop("extra_body", {})}
    prompt = kwargs.pop("prompt", PROMPT)
    return oai.completions.create(model=model, prompt=prompt, extra_body=extra, **kwargs)


def test_greedy_text_equals_the_grpc_apis(
    oai: openai.OpenAI, client: GenerationClient, model: str, tokenizer: Any
) -> None:
    response = _complete(oai, model, temperature=0)
    native = client.complete(PROMPT, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    assert response.object == "text_completion" and response.model == model
    (choice,) = response.choices
    assert choice.index == 0 and choice.finish_reason == "length"
    assert choice.text == native.text and choice.text
    # Usage in the tokenizer's counts.
    prompt_tokens = len(tokenizer.encode(PROMPT))
    assert response.usage.prompt_tokens == prompt_tokens == native.usage.prompt_tokens
    assert response.usage.completion_tokens == MAX_TOKENS
    assert response.usage.total_tokens == response.usage.prompt_tokens + MAX_TOKENS


def test_a_stream_carries_the_same_text_then_its_usage(oai: openai.OpenAI, model: str) -> None:
    whole = _complete(oai, model, temperature=0)
    chunks = list(
        _complete(oai, model, temperature=0, stream=True, stream_options={"include_usage": True})
    )
    *text_chunks, last = chunks
    assert last.choices == [] and last.usage is not None
    assert last.usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in text_chunks)
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_a_stream_without_include_usage_has_no_usage_chunk(oai: openai.OpenAI, model: str) -> None:
    chunks = list(_complete(oai, model, temperature=0, stream=True))
    assert chunks and all(c.choices and c.usage is None for c in chunks)


def test_n_choices_differ_under_sampling_and_agree_under_greedy(
    oai: openai.OpenAI, model: str
) -> None:
    sampled = _complete(oai, model, n=3, temperature=1.0, seed=11)
    assert [c.index for c in sampled.choices] == [0, 1, 2]
    assert len({c.text for c in sampled.choices}) == 3
    assert sampled.usage.completion_tokens == 3 * MAX_TOKENS
    assert sampled.usage.prompt_tokens == _complete(oai, model, max_tokens=1).usage.prompt_tokens
    greedy = _complete(oai, model, n=3, temperature=0)
    assert len({c.text for c in greedy.choices}) == 1


def test_n_choices_stream_by_index(oai: openai.OpenAI, model: str) -> None:
    whole = _complete(oai, model, n=3, temperature=1.0, seed=5)
    texts = ["", "", ""]
    finished = set()
    for chunk in _complete(oai, model, n=3, temperature=1.0, seed=5, stream=True):
        (choice,) = chunk.choices
        texts[choice.index] += choice.text
        if choice.finish_reason is not None:
            finished.add(choice.index)
    assert finished == {0, 1, 2}
    assert texts == [c.text for c in whole.choices]


def test_a_seed_reproduces_its_sample(oai: openai.OpenAI, model: str) -> None:
    first = _complete(oai, model, temperature=1.0, seed=1234)
    again = _complete(oai, model, temperature=1.0, seed=1234)
    other = _complete(oai, model, temperature=1.0, seed=4321)
    assert first.choices[0].text == again.choices[0].text
    assert first.choices[0].text != other.choices[0].text


def test_logprobs_in_openai_completion_shape(oai: openai.OpenAI, model: str) -> None:
    response = _complete(oai, model, temperature=0, logprobs=2)
    choice = response.choices[0]
    lp = choice.logprobs
    assert lp is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == MAX_TOKENS
    assert lp.text_offset[0] == 0
    for token, offset, after in zip(lp.tokens, lp.text_offset, lp.text_offset[1:]):
        assert after == offset + len(token)
    if "\ufffd" not in "".join(lp.tokens):  # whole characters: the tokens spell the text
        assert "".join(lp.tokens) == choice.text
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 2 <= len(top) <= 3  # the top two, and the chosen token if it is not one
        assert top[token] == chosen <= 0
        # Greedy: the chosen token is the most likely one.
        assert chosen == pytest.approx(max(top.values()))


def test_no_logprobs_unless_asked(oai: openai.OpenAI, model: str) -> None:
    assert _complete(oai, model, max_tokens=2).choices[0].logprobs is None


def test_a_stop_string_ends_the_text_before_it(
    oai: openai.OpenAI, model: str, client: GenerationClient
) -> None:
    full = _complete(oai, model, temperature=0, max_tokens=24).choices[0].text
    # A stop string from the middle of the greedy text, that does not occur before it.
    start = len(full) // 2
    stop = full[start : start + 3]
    assert stop.strip(), full
    cut = full.index(stop)
    response = _complete(oai, model, temperature=0, max_tokens=24, stop=[stop, "never-seen"])
    choice = response.choices[0]
    assert choice.text == full[:cut]
    assert choice.finish_reason == "stop"
    assert choice.model_extra["stop_reason"] == stop
    streamed = "".join(
        c.choices[0].text
        for c in _complete(oai, model, temperature=0, max_tokens=24, stop=stop, stream=True)
    )
    assert streamed == full[:cut]
    native = client.complete(PROMPT, max_tokens=24, temperature=0.0, ignore_eos=True, stop=[stop])
    assert native.text == choice.text


def test_echo_puts_the_prompt_first(oai: openai.OpenAI, model: str) -> None:
    plain = _complete(oai, model, temperature=0).choices[0].text
    echoed = _complete(oai, model, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + plain
    chunks = list(_complete(oai, model, temperature=0, echo=True, stream=True))
    assert chunks[0].choices[0].text == PROMPT
    assert "".join(c.choices[0].text for c in chunks) == PROMPT + plain


def test_token_id_and_batched_prompts(oai: openai.OpenAI, model: str, tokenizer: Any) -> None:
    other = "Pack my box with"
    ids = tokenizer.encode(PROMPT)
    by_text = _complete(oai, model, temperature=0).choices[0].text
    by_ids = _complete(oai, model, temperature=0, prompt=ids)
    assert by_ids.choices[0].text == by_text
    assert by_ids.usage.prompt_tokens == len(ids)
    other_text = _complete(oai, model, temperature=0, prompt=other).choices[0].text
    batch = _complete(oai, model, temperature=0, prompt=[PROMPT, other], n=2)
    # Choice index = prompt index * n + choice of that prompt, as OpenAI orders them.
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    assert [c.text for c in batch.choices] == [by_text, by_text, other_text, other_text]
    # Each prompt counted once, whatever its n.
    assert batch.usage.prompt_tokens == len(ids) + len(tokenizer.encode(other))
    assert batch.usage.completion_tokens == 4 * MAX_TOKENS


def test_logit_bias_forces_and_bans_tokens(
    oai: openai.OpenAI, model: str, tokenizer: Any, client: GenerationClient
) -> None:
    (token,) = tokenizer.encode(" fox", add_special_tokens=False)
    response = _complete(oai, model, temperature=0, max_tokens=4, logit_bias={str(token): 100})
    assert response.choices[0].text == " fox" * 4
    # A ban: the greedy first token, biased away, is not the first token any more.
    first = client.complete(PROMPT, max_tokens=1, temperature=0.0).token_ids[0]
    banned = _complete(oai, model, temperature=0, max_tokens=1, logit_bias={str(first): -100})
    assert banned.choices[0].text != tokenizer.decode([first])


def test_unset_max_tokens_is_the_server_default_cut_to_the_room_left(
    oai: openai.OpenAI, client: GenerationClient, model: str
) -> None:
    short = oai.completions.create(model=model, prompt=PROMPT, extra_body=NO_EOS)
    assert short.usage.completion_tokens == RequestLimits().default_max_tokens
    context = client.model_info().context_length
    nearly_full = [5] * (context - 3)  # the default would not fit; it must not fail
    long = oai.completions.create(model=model, prompt=nearly_full, extra_body=NO_EOS)
    assert long.usage.completion_tokens == 3 and long.choices[0].finish_reason == "length"
