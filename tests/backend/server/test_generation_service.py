"""GenerationService against a real server: streams, equality with the offline engine, usage."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pagedserve.backend.cli import build_parser
from pagedserve.backend.config import EngineConfig, RequestLimits
from pagedserve.backend.engine.request import RequestOutput
from pagedserve.backend.llm import LLM
from pagedserve.backend.sampling_params import SamplingParams
from pagedserve.backend.server.cli import server_config_from_args
from pagedserve.backend.server.server import BackgroundServer
from pagedserve.clients.client import AsyncGenerationClient, GenerationClient
from pagedserve.v1 import generation_pb2 as pb
from tests.backend.server.harness import READY_TIMEOUT_S, TINY_ENGINE

NUM_STREAMS = 32
MAX_TOKENS = 16
# Greedy outputs may part only where the reference's two best logits are this close
# (batch composition can change the last bits of a logit).
NEAR_TIE = 1e-4

PROMPTS = [
    f"Request {i}: " + " ".join(["the quick brown fox", "jumps over", "a lazy dog"][: 1 + i % 3])
    for i in range(NUM_STREAMS)
]


@pytest.fixture(scope="module")
def reference(tiny_llama_dir: Path) -> Iterator[list[RequestOutput]]:
    """The offline engine's greedy outputs for PROMPTS, with the top-2 logprobs per token."""
    llm = LLM(model=str(tiny_llama_dir), **TINY_ENGINE)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=2)
    yield llm.generate(PROMPTS, params)


def assert_matches_reference(tokens: list[int], ref: RequestOutput) -> None:
    """Equal, or parting once at a position where the reference had a near tie."""
    assert ref.logprobs is not None
    for i, (got, want) in enumerate(zip(tokens, ref.token_ids)):
        if got != want:
            top = ref.logprobs[i].top
            gap = abs(top[0][1] - top[1][1])
            assert gap < NEAR_TIE, (
                f"token {i} differs ({got} != {want}) and the reference's top-two gap is {gap}"
            )
            return
    assert tokens == ref.token_ids


async def _stream(client: AsyncGenerationClient, prompt: str) -> list[pb.GenerateResponse]:
    call = client.generate(prompt, max_tokens=MAX_TOKENS, temperature=0.0)
    return [response async for response in call]


async def test_32_concurrent_streams_match_offline(
    tiny_server: BackgroundServer, reference: list[RequestOutput]
) -> None:
    async with AsyncGenerationClient(tiny_server.address) as client:
        streams = await asyncio.gather(*(_stream(client, p) for p in PROMPTS))
    for responses, ref in zip(streams, reference):
        assert len(responses) >= 1
        last = responses[-1]
        assert last.finish_reason != pb.FINISH_REASON_UNSPECIFIED
        assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in responses[:-1])
        assert all(not r.HasField("usage") for r in responses[:-1])
        tokens = [t for r in responses for t in r.token_ids]
        text = "".join(r.text for r in responses)
        assert_matches_reference(tokens, ref)
        if tokens == ref.token_ids:
            assert text == ref.text
        # Usage counts exactly what was streamed.
        assert last.usage.completion_tokens == len(tokens)
        assert last.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert {r.request_id for r in responses} == {responses[0].request_id}
        assert responses[0].request_id


def test_request_id_is_echoed_or_assigned(client: GenerationClient) -> None:
    mine = [r.request_id for r in client.generate("Hi", request_id="my-id-7", max_tokens=3)]
    assert set(mine) == {"my-id-7"}
    assigned = {r.request_id for r in client.generate("Hi", max_tokens=3)}
    assert len(assigned) == 1 and "" not in assigned


def test_complete_equals_concatenated_stream(client: GenerationClient) -> None:
    kwargs = dict(max_tokens=12, temperature=0.0, logprobs=3)
    streamed = list(client.generate("Once upon a time", **kwargs))
    whole = client.complete("Once upon a time", **kwargs)
    assert whole.text == "".join(r.text for r in streamed)
    assert list(whole.token_ids) == [t for r in streamed for t in r.token_ids]
    assert whole.finish_reason == streamed[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert whole.usage == streamed[-1].usage
    assert len(whole.logprobs) == len(whole.token_ids) == 12
    for token, lp in zip(whole.token_ids, whole.logprobs):
        assert lp.token_id == token
        assert len(lp.top) == 3
        assert lp.logprob <= 0.0
        # Greedy picks the best token: its logprob is the top one.
        assert lp.logprob == pytest.approx(lp.top[0].logprob, abs=1e-6)


def test_prompt_token_ids_and_text_give_the_same_output(client: GenerationClient) -> None:
    ids = client.tokenize("Paged attention is")
    by_text = client.complete("Paged attention is", max_tokens=8, temperature=0.0)
    by_ids = client.complete(prompt_token_ids=ids, max_tokens=8, temperature=0.0)
    assert list(by_ids.token_ids) == list(by_text.token_ids)
    assert by_ids.usage.prompt_tokens == len(ids)


def test_chat_messages_use_the_chat_template(
    client: GenerationClient, tiny_server: BackgroundServer
) -> None:
    engine = tiny_server.state.engine
    assert engine is not None
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    rendered = engine.render_chat(messages)
    by_chat = client.complete(messages=messages, max_tokens=6, temperature=0.0)
    by_ids = client.complete(prompt_token_ids=rendered, max_tokens=6, temperature=0.0)
    assert by_chat.usage.prompt_tokens == len(rendered)
    assert list(by_chat.token_ids) == list(by_ids.token_ids)


def test_unset_fields_mean_engine_defaults(client: GenerationClient) -> None:
    # max_tokens unset -> the engine's default, not zero (which would be invalid).
    response = client.complete("Hello", temperature=0.0, ignore_eos=True)
    assert response.usage.completion_tokens == RequestLimits().default_max_tokens
    # temperature unset -> 1.0 sampling; with a seed it is reproducible.
    a = client.complete("Hello", seed=7, max_tokens=8)
    b = client.complete("Hello", seed=7, max_tokens=8)
    assert list(a.token_ids) == list(b.token_ids)


def test_unset_max_tokens_on_a_nearly_full_context_gets_the_room_left(
    client: GenerationClient,
) -> None:
    context = client.model_info().context_length
    response = client.complete(prompt_token_ids=[5] * (context - 3), ignore_eos=True)
    assert response.usage.completion_tokens == 3
    assert response.finish_reason == pb.FINISH_REASON_LENGTH


def test_stop_token_ends_the_stream_with_stop(client: GenerationClient) -> None:
    free = client.complete("Count with me:", max_tokens=10, temperature=0.0, ignore_eos=True)
    stop_at = free.token_ids[3]
    first = list(free.token_ids).index(stop_at)
    stopped = client.complete(
        "Count with me:", max_tokens=10, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_at]
    )
    assert stopped.finish_reason == pb.FINISH_REASON_STOP
    assert stopped.WhichOneof("stop_reason") == "stop_token_id"
    assert stopped.stop_token_id == stop_at
    assert list(stopped.token_ids) == list(free.token_ids[: first + 1])


def test_tokenize_and_model_info(client: GenerationClient, tiny_server: BackgroundServer) -> None:
    engine = tiny_server.state.engine
    assert engine is not None
    assert client.tokenize("hello world") == engine.tokenize("hello world")
    assert client.tokenize("hello", add_special_tokens=False) == engine.tokenize("hello", False)
    info = client.model_info()
    assert info.model_name == engine.model_info.name == tiny_server.state.served_model_name
    assert info.vocab_size == engine.model_info.vocab_size
    assert info.context_length == engine.model_info.max_model_len
    assert info.block_size == TINY_ENGINE["block_size"]
    assert info.dtype == "float32" and info.device == "cpu"
    assert list(info.eos_token_ids) == engine.model_info.eos_token_ids
    assert set(info.special_token_ids) >= set(info.eos_token_ids)


def test_model_name_must_match(client: GenerationClient) -> None:
    name = client.model_info().model_name
    assert client.complete("Hi", model=name, max_tokens=2).usage.completion_tokens >= 1
    for call in (
        lambda: client.complete("Hi", model="other-model", max_tokens=2),
        lambda: list(client.generate("Hi", model="other-model", max_tokens=2)),
        lambda: client.tokenize("Hi", model="other-model"),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "other-model" in info.value.details()


def test_get_load_reports_an_idle_cache(client: GenerationClient) -> None:
    load = client.load()
    assert load.num_total_blocks == TINY_ENGINE["num_blocks"]
    assert load.num_free_blocks == load.num_total_blocks
    assert load.kv_cache_usage == 0.0
    assert load.num_running == load.num_waiting == 0
    # Earlier tests ran prompts through the prefix cache.
    assert load.prefix_cache_queries > 0
    assert 0.0 <= load.prefix_cache_hit_rate <= 1.0


def test_prefix_cache_hits_show_in_usage_and_load(client: GenerationClient) -> None:
    prompt = list(range(100, 100 + 3 * TINY_ENGINE["block_size"] + 5))
    client.complete(prompt_token_ids=prompt, max_tokens=2, temperature=0.0)
    before = client.load()
    again = client.complete(prompt_token_ids=prompt, max_tokens=2, temperature=0.0)
    after = client.load()
    assert again.usage.cached_prompt_tokens == 3 * TINY_ENGINE["block_size"]
    assert after.prefix_cache_hits - before.prefix_cache_hits == again.usage.cached_prompt_tokens


def test_stream_interval_flag_groups_tokens_per_message(
    tiny_llama_dir: Path, reference: list[RequestOutput]
) -> None:
    """``serve --stream-interval 3``: every message after the first but the last carries at
    least 3 tokens, and the stream holds the same tokens and text."""
    args = build_parser().parse_args(
        ["serve", "--stream-interval", "3", "--host", "127.0.0.1", "--port", "0", "--no-metrics"]
    )
    server_config = server_config_from_args(args)
    assert server_config.stream_interval == 3
    engine_config = EngineConfig.from_kwargs(model=str(tiny_llama_dir), **TINY_ENGINE)
    server = BackgroundServer(server_config, engine_config)
    server.start()
    try:
        server.wait_ready(READY_TIMEOUT_S)
        with GenerationClient(server.address) as client:
            responses = list(client.generate(PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0.0))
    finally:
        server.stop()
    sizes = [len(r.token_ids) for r in responses]
    assert all(n >= 3 for n in sizes[1:-1]) and sum(sizes) == MAX_TOKENS, sizes
    assert len(responses) <= 1 + -(-(MAX_TOKENS - 1) // 3)
    assert_matches_reference([t for r in responses for t in r.token_ids], reference[0])
    assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH


def test_stream_interval_below_one_is_a_usage_error() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--stream-interval", "0"])


# -- n choices ------------------------------------------------------------------------------
CHOICE_PROMPT = "Once upon a time"
SAMPLED = dict(max_tokens=10, temperature=1.0, seed=11, ignore_eos=True)


def test_n_choices_stream_on_one_call_and_equal_separately_seeded_requests(
    client: GenerationClient,
) -> None:
    responses = list(client.generate(CHOICE_PROMPT, n=3, **SAMPLED))
    by_index: dict[int, list[pb.GenerateResponse]] = {}
    for response in responses:
        by_index.setdefault(response.index, []).append(response)
    assert sorted(by_index) == [0, 1, 2]
    streamed = {}
    for index, messages in by_index.items():
        last = messages[-1]
        assert last.finish_reason == pb.FINISH_REASON_LENGTH
        assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
        streamed[index] = [t for m in messages for t in m.token_ids]
        assert last.usage.completion_tokens == len(streamed[index]) == 10
        alone = client.complete(CHOICE_PROMPT, **{**SAMPLED, "seed": SAMPLED["seed"] + index})
        assert streamed[index] == list(alone.token_ids)
        assert "".join(m.text for m in messages) == alone.text
    assert len({tuple(tokens) for tokens in streamed.values()}) == 3

    whole = client.complete(CHOICE_PROMPT, n=3, **SAMPLED)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    assert {c.index: list(c.token_ids) for c in whole.choices} == streamed
    assert not whole.text and not whole.token_ids
    prompt_tokens = len(client.tokenize(CHOICE_PROMPT))
    assert whole.usage.prompt_tokens == prompt_tokens
    assert whole.usage.completion_tokens == 30
    assert all(c.usage.prompt_tokens == prompt_tokens for c in whole.choices)


def test_n_greedy_choices_are_identical(client: GenerationClient) -> None:
    whole = client.complete(CHOICE_PROMPT, n=2, max_tokens=8, temperature=0.0)
    first, second = whole.choices
    assert list(first.token_ids) == list(second.token_ids) and first.text == second.text


@pytest.mark.parametrize("n", [0, -1, 129])
def test_n_out_of_range_is_invalid_argument(client: GenerationClient, n: int) -> None:
    with pytest.raises(grpc.RpcError) as info:
        client.complete(CHOICE_PROMPT, n=n, max_tokens=2)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("n: ")
