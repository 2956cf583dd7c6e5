"""Admission checks and tokenization: a prompt and its parameters in, a valid ``Request`` out.

Kept apart from the engine so the process that receives requests can build and validate them
without holding the model: when the engine loop runs in its own process, the server's process
tokenizes and rejects bad requests itself, and only valid ``Request`` objects cross over.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from pagedserve.backend.engine.request import Request
from pagedserve.backend.errors import InvalidRequestError, RequestTooLongError
from pagedserve.backend.sampling_params import SamplingParams


def request_id_in_use(request_id: str) -> InvalidRequestError:
    """The error for an id that a live request already has."""
    return InvalidRequestError("request_id", f"{request_id!r} is already in use")


@dataclass
class RequestBuilder:
    """What admission needs to know of the loaded model and its KV cache. Picklable."""

    tokenizer: Any
    vocab_size: int
    max_model_len: int
    eos_token_ids: frozenset[int]
    block_size: int
    num_blocks: int

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not messages:
            raise InvalidRequestError("messages", "must not be empty")
        for i, m in enumerate(messages):
            if m.get("role") not in ("system", "user", "assistant"):
                raise InvalidRequestError(
                    "messages", f"message {i}: role must be system, user or assistant"
                )
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def build(
        self,
        *,
        prompt: str | None = None,
        prompt_token_ids: list[int] | None = None,
        params: SamplingParams,
        request_id: str | None = None,
    ) -> Request:
        """Validate and tokenize; raises a typed error naming the bad field. Whether the id is
        already in use is for the caller to check: only it knows the live requests."""
        if request_id is None or request_id == "":
            request_id = uuid.uuid4().hex
        if prompt_token_ids is None:
            if prompt is None or prompt == "":
                raise InvalidRequestError("prompt", "must not be empty")
            prompt_token_ids = self.tokenize(prompt)
        else:
            prompt_token_ids = list(prompt_token_ids)
            if not prompt_token_ids:
                raise InvalidRequestError("prompt_token_ids", "must not be empty")
            bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError(
                    "prompt_token_ids", f"ids must be in [0, {self.vocab_size}); got {bad[0]}"
                )
        params.validate(self.vocab_size)
        self._check_fits(len(prompt_token_ids), params.max_tokens)
        return Request(
            request_id=request_id,
            prompt_token_ids=prompt_token_ids,
            params=params,
            eos_token_ids=self.eos_token_ids,
        )

    def _check_fits(self, num_prompt: int, max_tokens: int) -> None:
        limit = self.max_model_len
        if num_prompt >= limit:
            raise RequestTooLongError(
                "prompt", f"{num_prompt} tokens leave no room in the model's context of {limit}"
            )
        if num_prompt + max_tokens > limit:
            raise RequestTooLongError(
                "max_tokens",
                f"prompt ({num_prompt}) + max_tokens ({max_tokens}) exceeds the model's "
                f"context of {limit} tokens",
            )
        needed = -(-(num_prompt + max_tokens) // self.block_size)
        if needed > self.num_blocks:
            raise RequestTooLongError(
                "max_tokens",
                f"prompt + max_tokens need {needed} KV blocks but the whole cache has "
                f"{self.num_blocks}",
            )
