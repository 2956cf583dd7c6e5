"""The offline API: ``LLM(model).generate(prompts, SamplingParams(...))``, and
``LLM(model).chat(messages)`` for conversations through the model's chat template.

The offline ``LLM`` is the engine core's client when no server runs: it admits requests (builds
and validates them, ids are its own) and steps the core in the calling thread.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from pagedserve.backend.config import EngineConfig
from pagedserve.backend.engine.core import EngineCore
from pagedserve.backend.engine.request import (
    FinishReason,
    Request,
    RequestOutput,
    RequestOutputDelta,
    TokenLogprob,
)
from pagedserve.backend.errors import InvalidRequestError, RequestFailedError
from pagedserve.backend.sampling_params import SamplingParams


class LLM:
    """Runs the engine in the calling thread until every submitted prompt is done.

    ``model=None`` is the embedded default model. Keyword arguments are the flat field names of
    the config dataclasses (``block_size``, ``num_blocks``, ``max_num_batched_tokens``, ...).
    """

    def __init__(self, model: str | None = None, **engine_kwargs: Any) -> None:
        self.engine = EngineCore(EngineConfig.from_kwargs(model=model, **engine_kwargs))

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLM:
        llm = cls.__new__(cls)
        llm.engine = EngineCore(config)
        return llm

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes (they also stop when this process exits)."""
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        prompt_token_ids: Sequence[list[int]] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); results come back in input order."""
        inputs: list[dict[str, Any]]
        if prompt_token_ids is not None:
            inputs = [{"prompt_token_ids": ids} for ids in prompt_token_ids]
        elif isinstance(prompts, str):
            inputs = [{"prompt": prompts}]
        else:
            inputs = [{"prompt": p} for p in prompts or []]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(inputs)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(inputs):
                raise ValueError("one SamplingParams per prompt, or a single one for all")

        # Validate everything before admitting anything, so a bad prompt leaves no orphans.
        requests = [
            self.engine.builder.build(params=p, **inp) for inp, p in zip(inputs, params_list)
        ]
        progress = None
        if use_tqdm:
            from tqdm import tqdm

            progress = tqdm(total=len(requests), desc="generate", unit="req")
        collected: dict[str, list[RequestOutputDelta]] = {r.request_id: [] for r in requests}
        try:
            for r in requests:
                self.engine.add(r)
            remaining = len(requests)
            while remaining:
                for delta in self.engine.step():
                    collected[delta.request_id].append(delta)
                    if delta.finished:
                        remaining -= 1
                        if progress is not None:
                            progress.update(1)
        finally:
            for r in requests:
                self.engine.abort(r.request_id)  # no-op for finished ones
            if progress is not None:
                progress.close()
        return [_assemble(r, collected[r.request_id]) for r in requests]

    def chat(
        self,
        messages: Sequence[Mapping[str, str]] | Sequence[Sequence[Mapping[str, str]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """The reply to one conversation (a list of ``{"role", "content"}`` messages) or to
        each of several, rendered by the model's chat template as the servers render theirs;
        results in input order. InvalidRequestError for a bad role or a model without a
        template."""
        conversations = _conversations(messages)
        ids = [
            self.engine.builder.render_chat(
                conversation,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
            )
            for conversation in conversations
        ]
        return self.generate(
            sampling_params=sampling_params, prompt_token_ids=ids, use_tqdm=use_tqdm
        )

    def stream(
        self,
        prompt: str | None = None,
        sampling_params: SamplingParams | None = None,
        *,
        prompt_token_ids: list[int] | None = None,
    ) -> Iterator[RequestOutputDelta]:
        """Yield one request's deltas as they are produced."""
        request = self.engine.builder.build(
            prompt=prompt, prompt_token_ids=prompt_token_ids, params=sampling_params or SamplingParams()
        )
        self.engine.add(request)
        try:
            while True:
                for delta in self.engine.step():
                    if delta.request_id == request.request_id:
                        yield delta
                        if delta.finished:
                            return
        finally:
            self.engine.abort(request.request_id)


def _conversations(
    messages: Sequence[Mapping[str, str]] | Sequence[Sequence[Mapping[str, str]]],
) -> list[list[dict[str, str]]]:
    """One conversation or several, as lists of plain message dicts."""
    if not messages:
        raise InvalidRequestError("messages", "must not be empty")
    singles = [m for m in messages if isinstance(m, Mapping)]
    if len(singles) == len(messages):
        return [[dict(m) for m in singles]]
    if singles:
        raise InvalidRequestError(
            "messages", "give one conversation (messages) or a list of them, not a mix"
        )
    return [[dict(m) for m in c] for c in messages if not isinstance(c, Mapping)]


def _assemble(request: Request, deltas: list[RequestOutputDelta]) -> RequestOutput:
    last = deltas[-1]
    logprobs: list[TokenLogprob] | None = None
    if request.params.logprobs is not None:
        logprobs = [lp for d in deltas for lp in (d.logprobs or [])]
    assert last.usage is not None and last.finish_reason is not None
    if last.finish_reason is FinishReason.ERROR:
        raise RequestFailedError(f"request {request.request_id} failed: {last.error}")
    return RequestOutput(
        request_id=request.request_id,
        prompt_token_ids=request.prompt_token_ids,
        text="".join(d.text for d in deltas),
        token_ids=[t for d in deltas for t in d.token_ids],
        finish_reason=last.finish_reason,
        usage=last.usage,
        logprobs=logprobs,
        stop_reason=last.stop_reason,
    )
