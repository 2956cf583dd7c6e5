"""Request fields to engine inputs: the one translation every API front goes through.

Each front (native gRPC, KServe v2, and the ones to come) reads its wire format into plain
Python values: a mapping of sampling field names to values, and the prompt in one of its forms.
This module turns those into the engine's terms (``SamplingParams``, ``PromptInput``), so a bad
field gets the same error whichever front carried it: an ``InvalidRequestError`` naming the
field, which the server answers with INVALID_ARGUMENT.

It checks names and types only. Value ranges belong to ``SamplingParams.validate``, which the
engine runs at admission, when it knows the vocabulary size. No protobuf or gRPC here: wire
formats are the fronts' business.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from pagedserve.backend.errors import InvalidRequestError
from pagedserve.backend.sampling_params import SamplingParams


class FieldType(enum.Enum):
    """What a sampling field holds; the value is how error messages describe it."""

    INT = "an integer"
    FLOAT = "a number"
    BOOL = "a boolean (true/false)"
    STR_LIST = "a string or a list of strings"
    INT_LIST = "a list of integers"
    TOKEN_BIAS = "an object of token ids to numbers"


class Coercion(enum.Enum):
    """How a front's values arrive, which decides what counts as the right type."""

    # Already Python ints, floats, bools and lists (protobuf fields, JSON bodies with a schema).
    TYPED = "typed"
    # Typed values, or text to parse: "0.7", "true", "8", "[2, 3]" (KServe JSON and parameters).
    TEXT = "text"


# The sampling and stopping fields a front may set, by SamplingParams name.
SAMPLING_FIELDS: Mapping[str, FieldType] = MappingProxyType(
    {
        "max_tokens": FieldType.INT,
        "temperature": FieldType.FLOAT,
        "top_p": FieldType.FLOAT,
        "top_k": FieldType.INT,
        "min_p": FieldType.FLOAT,
        "repetition_penalty": FieldType.FLOAT,
        "presence_penalty": FieldType.FLOAT,
        "frequency_penalty": FieldType.FLOAT,
        "seed": FieldType.INT,
        "min_tokens": FieldType.INT,
        "stop": FieldType.STR_LIST,
        "stop_token_ids": FieldType.INT_LIST,
        "ignore_eos": FieldType.BOOL,
        "include_stop_str_in_output": FieldType.BOOL,
        "logprobs": FieldType.INT,
        "skip_special_tokens": FieldType.BOOL,
        "detokenize": FieldType.BOOL,
        "logit_bias": FieldType.TOKEN_BIAS,
    }
)


# ---- coercions: each returns the value as its field's type or raises ValueError ---------------


def _typed_int(value: object) -> int:
    # bool is an int subclass, but True is never meant as a token count.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(value)


def _typed_float(value: object) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an int past float's range (JSON integers have no bound)
            raise ValueError(value) from None
    raise ValueError(value)


def _typed_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError(value)


def _str_list(value: object) -> list[str]:
    """A lone string is one stop string in either mode, as vLLM and OpenAI take ``stop``."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(value)


def _typed_int_list(value: object) -> list[int]:
    if isinstance(value, (list, tuple)):
        return [_typed_int(v) for v in value]
    raise ValueError(value)


def _text_int(value: object) -> int:
    """Also decimal text, and integral floats (JSON writers may send 8.0)."""
    if isinstance(value, str):
        return int(value)  # surrounding whitespace is allowed
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return _typed_int(value)


def _text_float(value: object) -> float:
    if isinstance(value, str):
        return float(value)
    return _typed_float(value)


_BOOL_WORDS: Mapping[str, bool] = {"true": True, "1": True, "false": False, "0": False}


def _text_bool(value: object) -> bool:
    """Also "true"/"false"/"1"/"0" in any case, and the integers 0 and 1."""
    if isinstance(value, str):
        word = value.strip().lower()
        if word not in _BOOL_WORDS:
            raise ValueError(value)
        return _BOOL_WORDS[word]
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    return _typed_bool(value)


def _text_int_list(value: object) -> list[int]:
    """Also a list written as JSON text: a request parameter cannot carry a list otherwise."""
    if isinstance(value, str):
        try:
            value = json.loads(value)  # JSONDecodeError is a ValueError
        except RecursionError:  # nested deeper than the parser's stack
            raise ValueError(value) from None
    if isinstance(value, (list, tuple)):
        return [_text_int(v) for v in value]
    raise ValueError(value)


def _token_id_key(key: object) -> int:
    """A token id as a mapping key: JSON object keys are always text (``{"50256": -100}``)."""
    if isinstance(key, str) and key.strip().lstrip("-").isdigit():
        return int(key)
    return _typed_int(key)


def _typed_token_bias(value: object) -> dict[int, float]:
    if isinstance(value, Mapping):
        return {_token_id_key(k): _typed_float(v) for k, v in value.items()}
    raise ValueError(value)


def _text_token_bias(value: object) -> dict[int, float]:
    """Also the object written as JSON text, as a request parameter carries it."""
    if isinstance(value, str):
        value = json.loads(value)
    if isinstance(value, Mapping):
        return {_token_id_key(k): _text_float(v) for k, v in value.items()}
    raise ValueError(value)


_COERCIONS: Mapping[Coercion, Mapping[FieldType, Callable[[object], object]]] = {
    Coercion.TYPED: {
        FieldType.INT: _typed_int,
        FieldType.FLOAT: _typed_float,
        FieldType.BOOL: _typed_bool,
        FieldType.STR_LIST: _str_list,
        FieldType.INT_LIST: _typed_int_list,
        FieldType.TOKEN_BIAS: _typed_token_bias,
    },
    Coercion.TEXT: {
        FieldType.INT: _text_int,
        FieldType.FLOAT: _text_float,
        FieldType.BOOL: _text_bool,
        FieldType.STR_LIST: _str_list,
        FieldType.INT_LIST: _text_int_list,
        FieldType.TOKEN_BIAS: _text_token_bias,
    },
}


# ---- sampling parameters ----------------------------------------------------------------------


def _field_type(name: str) -> FieldType:
    kind = SAMPLING_FIELDS.get(name)
    if kind is None:
        supported = ", ".join(sorted(SAMPLING_FIELDS))
        raise InvalidRequestError(name, f"unknown sampling parameter (supported: {supported})")
    return kind


def _coerce(name: str, kind: FieldType, value: object, coercion: Coercion) -> object:
    try:
        return _COERCIONS[coercion][kind](value)
    except ValueError:
        raise InvalidRequestError(name, f"must be {kind.value}, got {value!r}") from None


def build_sampling_params(values: Mapping[str, object], *, coercion: Coercion) -> SamplingParams:
    """SamplingParams from a front's field values, checked by name and type.

    A field that is absent or None keeps its default, so fronts pass through what the client
    sent without deciding defaults themselves. An unknown name is refused even when its value
    is None: a misspelt field must not pass silently.
    """
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        kind = _field_type(name)
        if value is not None:
            kwargs[name] = _coerce(name, kind, value, coercion)
    return SamplingParams(**kwargs)


# ---- prompt -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptInput:
    """The request's input in the form the client gave it; exactly one field is set.

    Chat messages stay unrendered: the engine owns the chat template (``engine.render_chat``).
    """

    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    messages: list[dict[str, str]] | None = None


_PROMPT_FORMS = "prompt, prompt_token_ids or messages"


def resolve_prompt(
    *,
    prompt: str | None = None,
    prompt_token_ids: list[int] | None = None,
    messages: list[dict[str, str]] | None = None,
) -> PromptInput:
    """The one input a request carries. Emptiness, token id ranges and message roles are
    checked where the engine uses them (admission, ``render_chat``)."""
    candidates = {"prompt": prompt, "prompt_token_ids": prompt_token_ids, "messages": messages}
    forms = [form for form, value in candidates.items() if value is not None]
    if not forms:
        raise InvalidRequestError("input", f"one of {_PROMPT_FORMS} is required")
    if len(forms) > 1:
        raise InvalidRequestError(
            "input", f"only one of {_PROMPT_FORMS} may be given, got {' and '.join(forms)}"
        )
    return PromptInput(prompt, prompt_token_ids, messages)
