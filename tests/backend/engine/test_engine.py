"""Engine behaviour on a tiny random model: prefix reuse, seeds, stops, validation, cleanup."""

from __future__ import annotations

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.backend.config import RequestLimits
from pagedserve.backend.engine.request import FinishReason
from pagedserve.backend.errors import InvalidRequestError, ModelLoadError, RequestTooLongError
from pagedserve.backend.sampling_params import MAX_TOKENS_UNSET


@pytest.fixture(scope="module")
def llm(tiny_llama_dir) -> LLM:
    return LLM(str(tiny_llama_dir), device="cpu", block_size=16, num_blocks=128, max_num_batched_tokens=512)


@pytest.fixture(autouse=True)
def all_blocks_free_after(llm):
    yield
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "a test left KV blocks allocated"
    assert not llm.engine.requests


def test_shared_prefix_reuses_blocks_and_computes_only_the_rest(llm) -> None:
    engine = llm.engine
    prefix = list(range(1000, 1080))  # 80 tokens = 5 full blocks
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    first = llm.generate(prompt_token_ids=[prefix + [5, 6, 7]], sampling_params=greedy)[0]
    hits_before = engine.block_manager.prefix_cache_hits

    second_prompt = prefix + [9, 10, 11, 12]
    request = engine.builder.build(prompt_token_ids=second_prompt, params=greedy)
    engine.add(request)
    deltas = engine.step()
    # The first step computed only the tokens after the cached 80.
    assert engine.last_step.num_prefill_tokens == len(second_prompt) - 80
    while not any(d.finished for d in deltas):
        deltas += engine.step()
    assert engine.block_manager.prefix_cache_hits - hits_before == 80
    assert deltas[-1].usage.cached_prompt_tokens == 80
    cached_tokens = [t for d in deltas for t in d.token_ids]

    cold = LLM(str(llm.engine.config.model.model), device="cpu", enable_prefix_caching=False)
    reference = cold.generate(prompt_token_ids=[second_prompt], sampling_params=greedy)[0]
    assert cached_tokens == reference.token_ids
    assert first.usage.cached_prompt_tokens == 0


def test_seed_reproduces_whatever_the_batch(llm) -> None:
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=42)
    alone = llm.generate(["Once upon a time"], params)[0].token_ids
    others = [SamplingParams(max_tokens=20, temperature=1.0) for _ in range(5)]
    crowd = llm.generate(
        ["Once upon a time", "a", "b c d", "The quick brown fox", "x" * 40, "hello"], [params] + others
    )
    assert crowd[0].token_ids == alone
    different = llm.generate(["Once upon a time"], SamplingParams(max_tokens=12, temperature=1.0, seed=43))
    assert different[0].token_ids != alone


def test_stop_string_ends_generation(llm) -> None:
    free_run = llm.generate(["In the beginning"], SamplingParams(max_tokens=30, temperature=0.0))[0]
    # Pick a stop string that straddles a token boundary inside the free-running output.
    text = free_run.text
    assert len(text) > 12
    stop = text[5:11]
    out = llm.generate(["In the beginning"], SamplingParams(max_tokens=30, temperature=0.0, stop=[stop]))[0]
    assert out.finish_reason is FinishReason.STOP and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt_token_ids": []}, "prompt_token_ids"),
        ({"prompt_token_ids": [10**9]}, "prompt_token_ids"),
        ({"prompt": "hi", "params": SamplingParams(max_tokens=0)}, "max_tokens"),
        ({"prompt": "hi", "params": SamplingParams(temperature=-0.5)}, "temperature"),
        ({"prompt": "hi", "params": SamplingParams(top_p=0.0)}, "top_p"),
        ({"prompt": "hi", "params": SamplingParams(top_p=1.5)}, "top_p"),
        ({"prompt": "hi", "params": SamplingParams(top_k=0)}, "top_k"),
        ({"prompt": "hi", "params": SamplingParams(top_k=-7)}, "top_k"),
        ({"prompt": "hi", "params": SamplingParams(min_p=2.0)}, "min_p"),
        ({"prompt": "hi", "params": SamplingParams(logprobs=999)}, "logprobs"),
    ],
)
def test_bad_input_raises_typed_error_naming_the_field(llm, kwargs, field) -> None:
    kwargs.setdefault("params", SamplingParams())
    with pytest.raises(InvalidRequestError) as info:
        llm.engine.builder.build(**kwargs)
    assert info.value.field == field and field in str(info.value)
    # The engine keeps serving.
    assert llm.generate(["still fine"], SamplingParams(max_tokens=2))[0].usage.completion_tokens == 2


def test_requests_that_can_never_fit_are_refused(llm) -> None:
    limit = llm.engine.max_model_len
    with pytest.raises(RequestTooLongError) as info:
        llm.engine.builder.build(prompt_token_ids=[5] * limit, params=SamplingParams())
    assert info.value.field == "prompt"
    with pytest.raises(RequestTooLongError) as info:
        llm.engine.builder.build(prompt_token_ids=[5] * 10, params=SamplingParams(max_tokens=limit))
    assert info.value.field == "max_tokens"


def test_unset_max_tokens_takes_the_default_cut_to_the_room_left(llm) -> None:
    builder = llm.engine.builder
    limit = llm.engine.max_model_len
    default = builder.limits.default_max_tokens
    shared = SamplingParams(temperature=0.0, ignore_eos=True)
    short = builder.build(prompt_token_ids=[5] * 10, params=shared)
    assert short.params.max_tokens == default
    # A nearly full context: the default would not fit, the room left is what it gets.
    nearly_full = [5] * (limit - 3)
    assert builder.build(prompt_token_ids=nearly_full, params=shared).params.max_tokens == 3
    assert shared.max_tokens == MAX_TOKENS_UNSET  # the caller's params stay unset
    out = llm.generate(prompt_token_ids=[nearly_full], sampling_params=shared)[0]
    assert out.usage.completion_tokens == 3 and out.finish_reason is FinishReason.LENGTH
    # min_tokens above the default raises it rather than failing min_tokens <= max_tokens.
    wanting_more = SamplingParams(min_tokens=default + 4)
    assert builder.build(prompt_token_ids=[5] * 10, params=wanting_more).params.max_tokens == (
        default + 4
    )


def test_chat_renders_the_template_for_one_or_several_conversations(llm) -> None:
    hello = [{"role": "user", "content": "Hello"}]
    briefly = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    params = SamplingParams(max_tokens=4, temperature=0.0)
    rendered = [llm.engine.builder.render_chat(c) for c in (hello, briefly)]
    expected = llm.generate(prompt_token_ids=rendered, sampling_params=params)
    (one,) = llm.chat(hello, params)
    assert one.prompt_token_ids == rendered[0] and one.token_ids == expected[0].token_ids
    both = llm.chat([hello, briefly], params)
    assert [o.prompt_token_ids for o in both] == rendered
    assert [o.token_ids for o in both] == [o.token_ids for o in expected]
    for bad in ([], [hello[0], hello], [{"role": "robot", "content": "beep"}]):
        with pytest.raises(InvalidRequestError):
            llm.chat(bad, params)


def test_a_default_max_tokens_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="--default-max-tokens"):
        RequestLimits(default_max_tokens=0)


def test_request_larger_than_the_whole_cache_is_refused(tiny_llama_dir) -> None:
    small = LLM(str(tiny_llama_dir), device="cpu", block_size=16, num_blocks=4)
    with pytest.raises(RequestTooLongError, match="KV blocks"):
        small.engine.builder.build(prompt_token_ids=[5] * 60, params=SamplingParams(max_tokens=10))


def test_unknown_model_path() -> None:
    with pytest.raises(ModelLoadError):
        LLM("/nonexistent/model/path", device="cpu")


def test_aborted_request_frees_its_blocks(llm) -> None:
    engine = llm.engine
    request = engine.builder.build(prompt_token_ids=list(range(100, 150)), params=SamplingParams(max_tokens=50))
    engine.add(request)
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    final = engine.abort(request.request_id)
    assert final is not None and final.finish_reason is FinishReason.ABORT


def test_logprobs_and_usage(llm) -> None:
    out = llm.generate(["Count: one two"], SamplingParams(max_tokens=5, temperature=0.0, logprobs=2))[0]
    assert out.logprobs is not None and len(out.logprobs) == 5
    for tok, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == tok and lp.top[0][0] == tok  # greedy picks the top-1
        assert lp.logprob <= 0.0 and len(lp.top) == 2
    assert out.usage.prompt_tokens == len(llm.tokenizer.encode("Count: one two"))
    assert out.usage.completion_tokens == 5 == len(out.token_ids)


def test_a_kv_budget_below_one_full_sequence_fails_at_start(tiny_llama_dir) -> None:
    # The tiny model's block (2 layers x 2 KV heads x 16 dims x 16 tokens x K and V, fp32) is
    # 8 KiB: 64 KiB hold 8 blocks = 128 tokens, short of max_model_len=1024.
    with pytest.raises(ModelLoadError, match=r"cpu_kv_cache_gib=.*holds 8 blocks.*max_model_len=1024"):
        LLM(str(tiny_llama_dir), device="cpu", block_size=16, cpu_kv_cache_gib=64 / (1 << 20),
            max_model_len=1024)
    # 512 KiB = 64 blocks = 1024 tokens, exactly one full sequence: it starts.
    LLM(str(tiny_llama_dir), device="cpu", block_size=16, cpu_kv_cache_gib=512 / (1 << 20),
        max_model_len=1024).shutdown()
