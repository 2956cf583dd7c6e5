"""A request's life inside the engine, how one is admitted, and what the engine hands back.

``RequestBuilder`` is admission's half that needs the model: tokenization and the checks that a
request is valid and can fit. It is picklable, so when the core runs in its own process the
server's process builds and rejects requests itself and only valid ``Request`` objects cross.
"""

from __future__ import annotations

import enum
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from pagedserve.backend.config import RequestLimits
from pagedserve.backend.errors import InvalidRequestError, RequestTooLongError
from pagedserve.backend.sampling_params import MAX_TOKENS_UNSET, SamplingParams

if TYPE_CHECKING:
    import torch

    from pagedserve.backend.engine.output import OutputState


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again, ahead of new arrivals; recomputes its tokens
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"  # cancelled by the client or the server
    ERROR = "error"  # failed inside the engine; ``error`` says why


@dataclass
class TokenLogprob:
    """Logprob of the sampled token and the top-n alternatives at that position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int


@dataclass
class RequestTimes:
    """Wall-clock marks (time.time()) for latency metrics and tracing spans."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None
    # When the scheduler preempted the request (its KV blocks freed, to be recomputed).
    preempted: list[float] = field(default_factory=list)


@dataclass(slots=True)
class RequestOutputDelta:
    """What changed for one request in one engine step. Concatenating every delta's ``text``
    gives exactly the final text; the last delta has ``finished=True``."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    usage: Usage | None = None
    error: str | None = None
    times: RequestTimes | None = None  # on the final delta
    num_preemptions: int = 0  # on the final delta
    num_prefill_chunks: int = 0  # on the final delta: steps that computed prompt tokens

    def followed_by(self, later: RequestOutputDelta) -> RequestOutputDelta:
        """This delta and the next one of the same request as one: text and tokens joined,
        everything that only the final delta carries taken from ``later``."""
        logprobs = None
        if self.logprobs is not None or later.logprobs is not None:
            logprobs = (self.logprobs or []) + (later.logprobs or [])
        return RequestOutputDelta(
            later.request_id,
            self.text + later.text,
            self.token_ids + later.token_ids,
            logprobs,
            later.finished,
            later.finish_reason,
            later.stop_reason,
            later.usage,
            later.error,
            later.times,
            later.num_preemptions,
            later.num_prefill_chunks,
        )


@dataclass
class RequestOutput:
    """A finished request, as the offline LLM returns it."""

    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    usage: Usage
    logprobs: list[TokenLogprob] | None = None
    stop_reason: str | int | None = None


@dataclass(eq=False)
class Request:
    """One request inside the engine core, and every piece of state it holds there: its tokens,
    scheduling progress, KV blocks and their prefix-cache hashes, its block-table row, its
    sampling generator, its token-history row and its output (detokenizer and stop-string)
    state. Finishing it is one call (``EngineCore._release``), which gives its blocks and rows
    back; everything else goes with the object. The engine thread alone mutates it.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.time)

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose K/V are in the cache or being computed by a launched step (prefix-cache
    # hits included).
    num_computed_tokens: int = 0
    # Tokens sampled by launched steps whose ids the host has not received yet. With overlapped
    # scheduling the next step is scheduled counting them as known; their ids reach that step's
    # inputs on the device (``runner.batch.InFlightTokens``).
    num_in_flight: int = 0
    # Prompt tokens served from the prefix cache at first admission (for usage).
    num_cached_prompt_tokens: int = -1
    # Another choice of the same API request, with the same prompt, sent before this one
    # (parallel sampling, ``n > 1``). While both live, this request maps that one's full prompt
    # blocks instead of computing them: the scheduler holds it back until they are computed.
    prompt_source_id: str | None = None
    # That request once the core has found it live (never sent over the wire).
    prompt_source: Request | None = None

    # -- speculative decoding (set by the core before a step; see backend/spec_decode) --------
    # The tokens proposed to follow its last known one, verified by its next step.
    draft_token_ids: list[int] = field(default_factory=list)
    num_draft_tokens: int = 0  # proposed and verified, over the request's life
    num_accepted_tokens: int = 0  # of those, the ones the target model agreed with

    # -- KV cache (written by the BlockManager only) -----------------------------------------
    # Position i // block_size's block; ``RELEASED_BLOCK`` for the leading blocks that fell out
    # of the model's attention window (``num_released_blocks`` of them).
    block_ids: list[int] = field(default_factory=list)
    num_released_blocks: int = 0
    # Chained hashes of its full blocks, computed once each; and how many leading full blocks
    # have been offered to the prefix index.
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0
    # Its row of the block table while it holds blocks, else -1.
    table_row: int = -1

    # -- sampling and output (set when the core admits it) -----------------------------------
    generator: torch.Generator | None = None
    output: OutputState | None = None
    # Its row of the sampler's ``TokenHistory`` once sampled with a penalty, else -1 (written
    # by the TokenHistory only).
    history_row: int = -1

    num_preemptions: int = 0
    # Steps that ran part of its prefill before the first token (chunked prefill).
    num_prefill_chunks: int = 0
    finish_reason: FinishReason | None = None
    times: RequestTimes = field(init=False)

    def __post_init__(self) -> None:
        self.times = RequestTimes(arrival=self.arrival_time)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens whose ids the host knows: the prompt and the outputs received so far."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_with_in_flight(self) -> int:
        """Known tokens plus those sampled on the device but not yet seen by the host."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_in_flight

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """``all_token_ids[start:end]`` without concatenating the whole sequence."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    def token_at(self, index: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < n else self.output_token_ids[index - n]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


# -- admission ---------------------------------------------------------------------------
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
    limits: RequestLimits = field(default_factory=RequestLimits)

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def render_chat(
        self,
        messages: list[dict[str, str]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
    ) -> list[int]:
        """The messages through the model's chat template. ``continue_final_message`` leaves
        the last (assistant) message open for the model to go on with, so it excludes
        ``add_generation_prompt``."""
        if not messages:
            raise InvalidRequestError("messages", "must not be empty")
        for i, m in enumerate(messages):
            if m.get("role") not in ("system", "user", "assistant"):
                raise InvalidRequestError(
                    "messages", f"message {i}: role must be system, user or assistant"
                )
        if continue_final_message:
            if add_generation_prompt:
                raise InvalidRequestError(
                    "continue_final_message", "needs add_generation_prompt to be false"
                )
            if messages[-1].get("role") != "assistant":
                raise InvalidRequestError(
                    "continue_final_message", "needs the last message to be the assistant's"
                )
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise InvalidRequestError("messages", "this model has no chat template")
        # transformers renders chat templates with jinja2 (torch needs it too).
        from jinja2.exceptions import TemplateError

        try:
            ids = self.tokenizer.apply_chat_template(
                messages,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tokenize=True,
            )
        except TemplateError as error:  # the template's own checks (say, alternating roles)
            raise InvalidRequestError(
                "messages", f"the chat template refused them: {error}"
            ) from None
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def room_for_output(self, num_prompt_tokens: int) -> int:
        """The most tokens a prompt of this length may ask for: what the model's context, the
        whole KV cache and ``--max-output-tokens`` leave (at least 1, so that a prompt with no
        room left is refused for its own length)."""
        room = min(self.max_model_len, self.num_blocks * self.block_size) - num_prompt_tokens
        if self.limits.max_output_tokens is not None:
            room = min(room, self.limits.max_output_tokens)
        return max(room, 1)

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
            if not prompt_token_ids:  # e.g. only control characters the tokenizer drops
                raise InvalidRequestError("prompt", "tokenizes to no tokens")
        else:
            prompt_token_ids = list(prompt_token_ids)
            if not prompt_token_ids:
                raise InvalidRequestError("prompt_token_ids", "must not be empty")
            bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError(
                    "prompt_token_ids", f"ids must be in [0, {self.vocab_size}); got {bad[0]}"
                )
        params = self._with_default_max_tokens(params, len(prompt_token_ids))
        params.validate(self.vocab_size)
        self._check_limits(len(prompt_token_ids), params)
        self._check_fits(len(prompt_token_ids), params.max_tokens)
        return Request(
            request_id=request_id,
            prompt_token_ids=prompt_token_ids,
            params=params,
            eos_token_ids=self.eos_token_ids,
        )

    def _with_default_max_tokens(self, params: SamplingParams, num_prompt: int) -> SamplingParams:
        """``params`` with an unset max_tokens replaced by the default (at least min_tokens),
        cut to the room the prompt leaves: a value the client never sent must not be what
        refuses its request. A copy, as one params object may serve several prompts."""
        if params.max_tokens != MAX_TOKENS_UNSET:
            return params
        wanted = max(self.limits.default_max_tokens, params.min_tokens)
        return replace(params, max_tokens=min(wanted, self.room_for_output(num_prompt)))

    def _check_limits(self, num_prompt: int, params: SamplingParams) -> None:
        """The server's per-request bounds (``RequestLimits``), beyond what the model allows."""
        limits = self.limits
        if limits.max_prompt_tokens is not None and num_prompt > limits.max_prompt_tokens:
            raise RequestTooLongError(
                "prompt", f"{num_prompt} tokens exceed this server's limit of "
                f"{limits.max_prompt_tokens} (--max-prompt-tokens)"
            )
        if limits.max_output_tokens is not None and params.max_tokens > limits.max_output_tokens:
            raise InvalidRequestError(
                "max_tokens", f"{params.max_tokens} exceeds this server's limit of "
                f"{limits.max_output_tokens} (--max-output-tokens)"
            )
        if len(params.stop) > limits.max_stop_strings:
            raise InvalidRequestError(
                "stop", f"{len(params.stop)} stop strings exceed the limit of "
                f"{limits.max_stop_strings} (--max-stop-strings)"
            )
        longest = max((len(s) for s in params.stop), default=0)
        if longest > limits.max_stop_string_chars:
            raise InvalidRequestError(
                "stop", f"a stop string of {longest} characters exceeds the limit of "
                f"{limits.max_stop_string_chars} (--max-stop-string-chars)"
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
