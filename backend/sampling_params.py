"""Per-request sampling and stopping parameters, validated once at admission."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedserve.backend.errors import InvalidRequestError

# Largest number of top logprobs a request may ask for per token.
MAX_LOGPROBS = 20
# The sampler works in float32 and int64 tensors: a temperature or penalty beyond float32's
# range would become inf there, a top_k past int64 would not convert at all (the whole step
# would fail). top_k keeps to the native API's int32 field on every front.
FLOAT32_MAX = 3.4028234663852886e38
MAX_TOP_K = 2**31 - 1
# A positive temperature below this draws as greedy: it is the limit of sampling as the
# temperature falls, and dividing float32 logits by less would overflow them.
GREEDY_BELOW_TEMPERATURE = 1e-5
# A logit bias is added to the token's logit: -100 bans it in practice, +100 all but forces it.
MAX_LOGIT_BIAS = 100.0
# ``max_tokens`` the client left unset: admission replaces it with the engine's
# ``--default-max-tokens``, cut to the room the prompt leaves, so a value the client never sent
# cannot make its request fail.
MAX_TOKENS_UNSET = -1
# The one default temperature of every front and CLI: 1.0 samples from the model's own
# distribution, as OpenAI's API, vLLM and transformers' sampling do; greedy decoding (0) is
# reproducible but loops on long answers, so it is asked for, never assumed.
DEFAULT_TEMPERATURE = 1.0


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    ``temperature=0`` is greedy, and so is any temperature below ``GREEDY_BELOW_TEMPERATURE``
    (set to 0 on construction). ``top_k=-1`` and ``top_p=1`` switch those filters off. Penalties
    follow the common definitions: ``repetition_penalty`` divides positive logits (multiplies
    negative ones) of every token seen in prompt or output; ``presence_penalty`` and
    ``frequency_penalty`` subtract from tokens already generated.

    ``max_tokens`` left at ``MAX_TOKENS_UNSET`` becomes the engine's default at admission
    (``RequestLimits.default_max_tokens``, at most what the context and cache leave).
    """

    max_tokens: int = MAX_TOKENS_UNSET
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    # False skips text entirely (token ids only): for benchmarks whose random token ids the
    # tokenizer need not know.
    detokenize: bool = True
    # Added to these tokens' logits before sampling (token id -> bias in [-100, 100]).
    logit_bias: dict[int, float] | None = None

    def __post_init__(self) -> None:
        if 0.0 < self.temperature < GREEDY_BELOW_TEMPERATURE:
            self.temperature = 0.0
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        """Whether a penalty reads the request's earlier tokens (its row of the sampler's token
        history)."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise InvalidRequestError naming the first bad field."""
        if not isinstance(self.max_tokens, int) or (
            self.max_tokens < 1 and self.max_tokens != MAX_TOKENS_UNSET
        ):
            raise InvalidRequestError("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= FLOAT32_MAX:  # also rejects NaN and inf
            raise InvalidRequestError(
                "temperature", f"must be >= 0 and at most {FLOAT32_MAX:.4g}, got {self.temperature}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k == 0 or not -1 <= self.top_k <= MAX_TOP_K:
            raise InvalidRequestError(
                "top_k", f"must be -1 (off) or in [1, {MAX_TOP_K}], got {self.top_k}"
            )
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError("min_p", f"must be in [0, 1], got {self.min_p}")
        if not 0.0 < self.repetition_penalty <= FLOAT32_MAX:
            raise InvalidRequestError(
                "repetition_penalty",
                f"must be > 0 and at most {FLOAT32_MAX:.4g}, got {self.repetition_penalty}",
            )
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise InvalidRequestError(
                "presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}"
            )
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise InvalidRequestError(
                "frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}"
            )
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequestError("seed", f"must be in [0, 2^63), got {self.seed}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise InvalidRequestError("min_tokens", f"must be >= 0, got {self.min_tokens}")
        if self.max_tokens != MAX_TOKENS_UNSET and self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                "min_tokens", f"must not exceed max_tokens ({self.min_tokens} > {self.max_tokens})"
            )
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise InvalidRequestError("stop", "stop strings must be non-empty")
        if self.stop and not self.detokenize:
            raise InvalidRequestError("stop", "stop strings need detokenize=True")
        if vocab_size is not None and any(not 0 <= t < vocab_size for t in self.stop_token_ids):
            raise InvalidRequestError("stop_token_ids", f"ids must be in [0, {vocab_size})")
        if self.logit_bias is not None:
            self._validate_logit_bias(vocab_size)
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError(
                "logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}"
            )

    def _validate_logit_bias(self, vocab_size: int | None) -> None:
        assert self.logit_bias is not None
        for token_id, bias in self.logit_bias.items():
            if vocab_size is not None and not 0 <= token_id < vocab_size:
                raise InvalidRequestError(
                    "logit_bias", f"token ids must be in [0, {vocab_size}), got {token_id}"
                )
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:  # also rejects NaN
                raise InvalidRequestError(
                    "logit_bias",
                    f"biases must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                    f"got {bias} for token {token_id}",
                )
