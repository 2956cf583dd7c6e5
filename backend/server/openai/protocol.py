"""OpenAI request bodies read into the engine's terms, every field checked by name.

Sampling fields go through ``translate.build_sampling_params`` under SamplingParams' names (the
one translation every front uses), so a wrong type here and a value out of range at admission
(``SamplingParams.validate``, ``RequestBuilder``: the server's limits included) are the same
errors as on the gRPC fronts. Where OpenAI names a field otherwise (``max_completion_tokens``,
chat's ``top_logprobs``), the request's ``renames`` map the engine's name back, so the 400
names the field the client sent.

A field the endpoint does not know is refused by name, as OpenAI refuses it: a misspelt field
must not pass silently. A known OpenAI field that pagedserve does not implement (tools, audio,
``suffix``...) is refused too, unless it holds a value that asks for nothing (``null``,
``tools: []``, ``best_of`` equal to ``n``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from pagedserve.backend.errors import InvalidRequestError
from pagedserve.backend.sampling_params import MAX_TOKENS_UNSET, SamplingParams
from pagedserve.backend.server.choices import checked_num_choices
from pagedserve.backend.server.translate import Coercion, build_sampling_params

# Sampling fields taken as they are, under SamplingParams' own names: OpenAI's, then vLLM's
# common extras.
_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "stop",
    "logit_bias",
    "top_k",
    "min_p",
    "repetition_penalty",
    "ignore_eos",
    "min_tokens",
    "skip_special_tokens",
    "stop_token_ids",
    "include_stop_str_in_output",
)
_COMMON_FIELDS = frozenset(
    {*_SAMPLING_FIELDS, "model", "n", "stream", "stream_options", "user", "max_tokens"}
)
_COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "echo", "logprobs", "best_of", "suffix"}
_CHAT_FIELDS = _COMMON_FIELDS | {
    "messages",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "add_generation_prompt",
    "continue_final_message",
}
_STREAM_OPTIONS = frozenset({"include_usage"})

# OpenAI chat fields pagedserve does not implement, each with the values that ask for nothing.
_CHAT_NO_OPS: Mapping[str, Callable[[Any], bool]] = MappingProxyType(
    {
        "tools": lambda v: v == [],
        "tool_choice": lambda v: v == "none",
        "parallel_tool_calls": lambda v: isinstance(v, bool),
        "functions": lambda v: v == [],
        "function_call": lambda v: v == "none",
        "response_format": lambda v: v == {"type": "text"},
        "modalities": lambda v: v == ["text"],
        "store": lambda v: v is False,
        "service_tier": lambda v: v in ("auto", "default"),
        "audio": lambda v: False,
        "prediction": lambda v: False,
        "reasoning_effort": lambda v: False,
        "metadata": lambda v: False,
        "web_search_options": lambda v: False,
    }
)
# Message roles the chat template takes; "developer" is OpenAI's newer name for "system".
_ROLES: Mapping[str, str] = MappingProxyType(
    {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
)
_MESSAGE_FIELDS = frozenset({"role", "content", "name"})
# Assistant-message fields that only tool calling fills; empty they ask for nothing.
_MESSAGE_NO_OPS = frozenset({"tool_calls", "refusal", "function_call", "audio"})


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class _Body:
    """A request's JSON object; ``null`` counts as absent, as OpenAI's optional fields do."""

    def __init__(
        self, data: Any, known: frozenset[str], no_ops: Mapping[str, Callable[[Any], bool]]
    ) -> None:
        if not isinstance(data, dict):
            raise InvalidRequestError("body", f"must be a JSON object, got {_kind(data)}")
        for name, value in data.items():
            if name in no_ops:
                if value is not None and not no_ops[name](value):
                    raise InvalidRequestError(name, "is not supported by this server")
            elif name not in known:
                raise InvalidRequestError(name, "unknown field")
        self._data = data

    def has(self, name: str) -> bool:
        return self._data.get(name) is not None

    def get(self, name: str) -> Any:
        return self._data.get(name)

    def read_bool(self, name: str, default: bool) -> bool:
        value = self.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise InvalidRequestError(name, f"must be a boolean, got {value!r}")
        return value

    def read_int(self, name: str) -> int | None:
        value = self.get(name)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidRequestError(name, f"must be an integer, got {value!r}")
        return value

    def read_str(self, name: str) -> str | None:
        value = self.get(name)
        if value is not None and not isinstance(value, str):
            raise InvalidRequestError(name, f"must be a string, got {value!r}")
        return value


@dataclass(frozen=True)
class Generation:
    """What both endpoints ask of the engine besides the prompt."""

    model: str
    # max_tokens is the endpoint's default where the client left it out (``max_tokens_given``).
    params: SamplingParams
    max_tokens_given: bool
    n: int
    stream: bool
    include_usage: bool
    # Engine field -> the request's name for it, for the errors of admission.
    renames: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CompletionRequest:
    generation: Generation
    # Each a text or token ids; several for a batch (choice index = prompt index * n + i).
    prompts: list[str | list[int]]
    echo: bool
    logprobs: int | None  # top alternatives per token; None: no logprobs


@dataclass(frozen=True)
class ChatRequest:
    generation: Generation
    messages: list[dict[str, str]]
    add_generation_prompt: bool
    continue_final_message: bool
    logprobs: bool
    top_logprobs: int


def parse_completion(data: Any) -> CompletionRequest:
    body = _Body(data, _COMPLETION_FIELDS, {})
    if body.has("suffix"):
        raise InvalidRequestError("suffix", "is not supported by this server")
    logprobs = body.read_int("logprobs")
    echo = body.read_bool("echo", False)
    if echo and logprobs is not None:
        raise InvalidRequestError(
            "echo", "cannot be combined with logprobs: prompt logprobs are not computed"
        )
    prompts = _prompts(body.get("prompt"))
    generation = _generation(
        body,
        max_tokens=body.read_int("max_tokens"),
        logprobs=logprobs,
        renames={"prompt_token_ids": "prompt"},
        num_prompts=len(prompts),
    )
    best_of = body.read_int("best_of")
    if best_of is not None and best_of != generation.n:
        raise InvalidRequestError("best_of", "is not supported by this server (only equal to n)")
    return CompletionRequest(generation, prompts, echo, logprobs)


def parse_chat(data: Any) -> ChatRequest:
    body = _Body(data, _CHAT_FIELDS, _CHAT_NO_OPS)
    messages = _messages(body.get("messages"))
    logprobs = body.read_bool("logprobs", False)
    top_logprobs = body.read_int("top_logprobs")
    if top_logprobs is not None and not logprobs:
        raise InvalidRequestError("top_logprobs", "needs logprobs to be true")
    max_tokens = body.read_int("max_tokens")
    max_completion_tokens = body.read_int("max_completion_tokens")
    renames = {"prompt": "messages", "prompt_token_ids": "messages", "logprobs": "top_logprobs"}
    if max_completion_tokens is not None:
        if max_tokens is not None and max_tokens != max_completion_tokens:
            raise InvalidRequestError(
                "max_completion_tokens", "differs from max_tokens: give one of them"
            )
        max_tokens = max_completion_tokens
        renames["max_tokens"] = "max_completion_tokens"
    add_generation_prompt = body.read_bool("add_generation_prompt", True)
    continue_final_message = body.read_bool("continue_final_message", False)
    generation = _generation(
        body,
        max_tokens=max_tokens,
        logprobs=(top_logprobs or 0) if logprobs else None,
        renames=renames,
        num_prompts=1,
    )
    return ChatRequest(
        generation, messages, add_generation_prompt, continue_final_message, logprobs,
        top_logprobs or 0,
    )


def _generation(
    body: _Body,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    renames: Mapping[str, str],
    num_prompts: int,
) -> Generation:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequestError("model", f"is required (a string), got {body.get('model')!r}")
    body.read_str("user")
    n = checked_num_choices(body.read_int("n"), num_prompts)
    stream = body.read_bool("stream", False)
    include_usage = _include_usage(body, stream)
    values: dict[str, object] = {name: body.get(name) for name in _SAMPLING_FIELDS}
    # Unset: the engine's --default-max-tokens (16, OpenAI's completions default) cut to the
    # room the prompt leaves; chat replaces it with all of that room (OpenAI's chat default).
    values["max_tokens"] = max_tokens if max_tokens is not None else MAX_TOKENS_UNSET
    values["logprobs"] = logprobs
    params = build_sampling_params(values, coercion=Coercion.TYPED)
    return Generation(
        model, params, max_tokens is not None, n, stream, include_usage, dict(renames)
    )


def _include_usage(body: _Body, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise InvalidRequestError("stream_options", "is only allowed when stream is true")
    if not isinstance(options, dict):
        raise InvalidRequestError("stream_options", f"must be an object, got {options!r}")
    for name in options:
        if name not in _STREAM_OPTIONS:
            raise InvalidRequestError(f"stream_options.{name}", "unknown field")
    include = options.get("include_usage")
    if include is not None and not isinstance(include, bool):
        raise InvalidRequestError(
            "stream_options.include_usage", f"must be a boolean, got {include!r}"
        )
    return bool(include)


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


def _prompts(value: Any) -> list[str | list[int]]:
    """A text, token ids, or a batch of either (OpenAI's four forms of ``prompt``)."""
    if value is None:
        raise InvalidRequestError("prompt", "is required")
    if isinstance(value, str):
        prompts: list[str | list[int]] = [value]
    elif _is_token_ids(value) and value:
        prompts = [value]
    elif isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        prompts = list(value)
    elif isinstance(value, list) and value and all(_is_token_ids(p) for p in value):
        prompts = list(value)
    else:
        raise InvalidRequestError(
            "prompt",
            "must be a string, a list of token ids, or a non-empty list of either, "
            f"got {value!r}"[:200],
        )
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            name = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            raise InvalidRequestError(name, "must not be empty")
    return prompts


def _messages(value: Any) -> list[dict[str, str]]:
    """Chat turns as the template takes them: a role and text content each."""
    if not isinstance(value, list) or not value:
        raise InvalidRequestError("messages", f"must be a non-empty list, got {value!r}"[:200])
    return [_message(i, m) for i, m in enumerate(value)]


def _message(i: int, message: Any) -> dict[str, str]:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise InvalidRequestError(where, f"must be an object, got {_kind(message)}")
    for name, value in message.items():
        if name in _MESSAGE_NO_OPS:
            if value not in (None, []):
                raise InvalidRequestError(f"{where}.{name}", "is not supported by this server")
        elif name not in _MESSAGE_FIELDS:
            raise InvalidRequestError(f"{where}.{name}", "unknown field")
    role = message.get("role")
    mapped = _ROLES.get(role) if isinstance(role, str) else None
    if mapped is None:
        raise InvalidRequestError(
            f"{where}.role",
            f"must be system, developer, user or assistant, got {role!r}"
            + (" (tool calling is not supported)" if role in ("tool", "function") else ""),
        )
    rendered = {"role": mapped, "content": _content(where, message.get("content"))}
    name = message.get("name")
    if name is not None:
        if not isinstance(name, str):
            raise InvalidRequestError(f"{where}.name", f"must be a string, got {name!r}")
        rendered["name"] = name
    return rendered


def _content(where: str, content: Any) -> str:
    """A string, or a list of text parts (joined with newlines, as vLLM joins them)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError(
            f"{where}.content", f"must be a string or a list of text parts, got {_kind(content)}"
        )
    texts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise InvalidRequestError(at, f"must be an object, got {_kind(part)}")
        if part.get("type") != "text":
            raise InvalidRequestError(
                f"{at}.type", f"only 'text' parts are supported, got {part.get('type')!r}"
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise InvalidRequestError(f"{at}.text", f"must be a string, got {_kind(text)}")
        texts.append(text)
    return "\n".join(texts)
