"""The request translation every front goes through: field names, types, the two coercions,
the prompt's forms, and the same field named alike through the native and KServe fronts."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

import pytest

from pagedserve.backend.errors import InvalidRequestError
from pagedserve.backend.sampling_params import SamplingParams
from pagedserve.backend.server import kserve_protocol as kp
from pagedserve.backend.server.generation_service import (
    prompt_input_from_proto,
    sampling_params_from_proto,
)
from pagedserve.backend.server.kserve_convert import parse_infer_request
from pagedserve.backend.server.translate import (
    SAMPLING_FIELDS,
    Coercion,
    FieldType,
    PromptInput,
    build_sampling_params,
    resolve_prompt,
)
from pagedserve.v1 import generation_pb2 as pb

MODEL = "tiny"
VOCAB = 100

# (field, value, what SamplingParams holds): values both coercions take as they are.
TYPED_VALUES: list[tuple[str, Any, Any]] = [
    ("max_tokens", 8, 8),
    ("top_k", -1, -1),
    ("seed", 2**62, 2**62),
    ("logprobs", 0, 0),
    ("temperature", 0.7, 0.7),
    ("temperature", 1, 1.0),  # an int where a float goes is a float
    ("min_p", 0.0, 0.0),
    ("ignore_eos", True, True),
    ("skip_special_tokens", False, False),
    ("stop", "\n", ["\n"]),  # a lone string is one stop string
    ("stop", ["a", "b"], ["a", "b"]),
    ("stop", ("a",), ["a"]),
    ("stop_token_ids", [2, 3], [2, 3]),
    ("stop_token_ids", [], []),
    # JSON object keys are text: token ids arrive as "5" (or as ints from Python callers).
    ("logit_bias", {"5": -100, 7: 2.5}, {5: -100.0, 7: 2.5}),
    ("logit_bias", {}, {}),
]

# Text forms that only the text coercion parses.
TEXT_VALUES: list[tuple[str, Any, Any]] = [
    ("max_tokens", "8", 8),
    ("max_tokens", " 8 ", 8),
    ("max_tokens", 8.0, 8),  # JSON writers may send integral floats
    ("seed", "-1", -1),  # ranges are validate's business, not the coercion's
    ("temperature", "0.7", 0.7),
    ("temperature", "0", 0.0),
    ("top_p", " 0.9 ", 0.9),
    ("ignore_eos", "true", True),
    ("ignore_eos", "TRUE", True),
    ("ignore_eos", "False", False),
    ("ignore_eos", "1", True),
    ("ignore_eos", "0", False),
    ("ignore_eos", 1, True),
    ("ignore_eos", 0, False),
    ("stop_token_ids", "[2, 3]", [2, 3]),
    ("stop_token_ids", ["2", 3.0], [2, 3]),
    ("logit_bias", '{"5": 1}', {5: 1.0}),
    ("logit_bias", {"5": "1.5"}, {5: 1.5}),
]

# (field, value) that the text coercion refuses too: the typed coercion refuses these and
# every form of TEXT_VALUES.
BAD_VALUES: list[tuple[str, Any]] = [
    ("temperature", "abc"),
    ("temperature", "warm"),
    ("temperature", True),
    ("temperature", [0.5]),
    ("max_tokens", "8.5"),
    ("max_tokens", "lots"),
    ("max_tokens", 1.5),
    ("max_tokens", True),
    ("seed", "abc"),
    ("ignore_eos", "maybe"),
    ("ignore_eos", 2),
    ("ignore_eos", 0.0),
    ("stop", 3),
    ("stop", ["ok", 3]),
    ("stop_token_ids", "x"),
    ("stop_token_ids", "5"),
    ("stop_token_ids", [2, "x"]),
    ("stop_token_ids", [True]),
    ("stop_token_ids", 5),
    # JSON text nested deeper than the parser's stack (a RecursionError inside json.loads).
    ("stop_token_ids", "[" * 50_000 + "]" * 50_000),
    # An integer past float's range (float() raises OverflowError).
    ("temperature", 10**400),
    ("logit_bias", [1]),
    ("logit_bias", "nope"),
    ("logit_bias", {"x": 1}),
    ("logit_bias", {"5": True}),
    ("logit_bias", {"5": "big"}),
]


def _held(field: str, value: Any, coercion: Coercion) -> Any:
    return getattr(build_sampling_params({field: value}, coercion=coercion), field)


def _refused(field: str, value: Any, coercion: Coercion) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        build_sampling_params({field: value}, coercion=coercion)
    assert info.value.field == field
    return info.value


# ---- the field table ----------------------------------------------------------------------------

# The annotations each field type stands for on SamplingParams.
_ANNOTATIONS: dict[FieldType, tuple[Any, ...]] = {
    FieldType.INT: (int, int | None),
    FieldType.FLOAT: (float,),
    FieldType.BOOL: (bool,),
    FieldType.STR_LIST: (list[str],),
    FieldType.INT_LIST: (list[int],),
    FieldType.TOKEN_BIAS: (dict[int, float] | None,),
}


def test_every_sampling_field_is_in_the_table_with_its_type() -> None:
    hints = typing.get_type_hints(SamplingParams)
    fields = [f.name for f in dataclasses.fields(SamplingParams)]
    assert sorted(SAMPLING_FIELDS) == sorted(fields)
    for name, kind in SAMPLING_FIELDS.items():
        assert hints[name] in _ANNOTATIONS[kind], name


# ---- coercions ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value", "expected"), TYPED_VALUES)
@pytest.mark.parametrize("coercion", list(Coercion))
def test_typed_values_are_taken_by_both_coercions(
    field: str, value: Any, expected: Any, coercion: Coercion
) -> None:
    held = _held(field, value, coercion)
    assert held == expected and type(held) is type(expected)


@pytest.mark.parametrize(("field", "value", "expected"), TEXT_VALUES)
def test_text_coercion_parses_text_forms(field: str, value: Any, expected: Any) -> None:
    held = _held(field, value, Coercion.TEXT)
    assert held == expected and type(held) is type(expected)


@pytest.mark.parametrize(("field", "value", "expected"), TEXT_VALUES)
def test_typed_coercion_refuses_text_forms(field: str, value: Any, expected: Any) -> None:
    error = _refused(field, value, Coercion.TYPED)
    assert error.message == f"must be {SAMPLING_FIELDS[field].value}, got {value!r}"


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
@pytest.mark.parametrize("coercion", list(Coercion))
def test_wrong_types_are_refused_naming_the_field(
    field: str, value: Any, coercion: Coercion
) -> None:
    error = _refused(field, value, coercion)
    assert error.message == f"must be {SAMPLING_FIELDS[field].value}, got {value!r}"


@pytest.mark.parametrize("coercion", list(Coercion))
@pytest.mark.parametrize("value", [2, None])
def test_unknown_names_are_refused_naming_them(coercion: Coercion, value: Any) -> None:
    with pytest.raises(InvalidRequestError, match="unknown sampling parameter") as info:
        build_sampling_params({"max_tokens": 4, "best_of": value}, coercion=coercion)
    assert info.value.field == "best_of"
    assert "temperature" in info.value.message  # the supported names are listed


@pytest.mark.parametrize("coercion", list(Coercion))
def test_absent_or_none_means_the_default(coercion: Coercion) -> None:
    assert build_sampling_params({}, coercion=coercion) == SamplingParams()
    values = {"seed": None, "max_tokens": None, "stop": None, "logprobs": None}
    assert build_sampling_params(values, coercion=coercion) == SamplingParams()


# ---- prompt -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "forms",
    [
        {"prompt": "hi"},
        {"prompt": ""},  # emptiness is admission's to refuse, naming `prompt`
        {"prompt_token_ids": [1, 2]},
        {"messages": [{"role": "user", "content": "hi"}]},
    ],
)
def test_one_prompt_form_is_resolved_as_given(forms: dict[str, Any]) -> None:
    assert resolve_prompt(**forms) == PromptInput(**forms)


@pytest.mark.parametrize(
    "forms",
    [{}, {"prompt": "hi", "prompt_token_ids": [1]}, {"prompt_token_ids": [1], "messages": []}],
)
def test_no_or_several_prompt_forms_are_refused_as_input(forms: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequestError) as info:
        resolve_prompt(**forms)
    assert info.value.field == "input"
    assert all(form in info.value.message for form in forms)


# ---- the fronts go through it -------------------------------------------------------------------


def _native_request(**fields: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt="hi", **fields)


def _kserve_request(sampling: dict[str, Any]) -> Any:
    request = kp.ModelInferRequest(model_name=MODEL, id="k")
    text = request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    text.contents.bytes_contents.append(b"hi")
    tensor = request.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(json.dumps(sampling).encode())
    return request


# Every sampling field of the native request, off its default.
NATIVE_FIELDS: dict[str, Any] = {
    "temperature": 0.5,
    "top_p": 0.75,
    "top_k": 7,
    "min_p": 0.125,
    "repetition_penalty": 1.5,
    "presence_penalty": 0.25,
    "frequency_penalty": -0.25,
    "seed": 11,
    "max_tokens": 9,
    "min_tokens": 2,
    "stop": ["\n", "END"],
    "stop_token_ids": [3, 4],
    "ignore_eos": True,
    "include_stop_str_in_output": True,
    "skip_special_tokens": False,
    "logprobs": 3,
}


def test_native_front_passes_every_set_field_and_leaves_unset_ones_default() -> None:
    assert sampling_params_from_proto(_native_request(**NATIVE_FIELDS)) == SamplingParams(
        **NATIVE_FIELDS
    )
    assert sampling_params_from_proto(_native_request()) == SamplingParams()
    # Proto3 `optional`: a field set to its zero value is set, not "unset".
    assert sampling_params_from_proto(_native_request(temperature=0.0)).temperature == 0.0


def test_both_fronts_translate_the_same_fields_alike() -> None:
    """Every field both carry (KServe has no logprobs output, so refuses them)."""
    shared = {name: value for name, value in NATIVE_FIELDS.items() if name != "logprobs"}
    native = sampling_params_from_proto(_native_request(**shared))
    kserve = parse_infer_request(_kserve_request(shared), MODEL).params
    assert native == kserve


def test_native_front_without_input_names_input() -> None:
    with pytest.raises(InvalidRequestError) as info:
        prompt_input_from_proto(pb.GenerateRequest(max_tokens=2))
    assert info.value.field == "input"


# A value of the right type but out of range, for every field that has a range.
OUT_OF_RANGE: list[tuple[str, Any]] = [
    ("temperature", -0.5),
    ("top_p", 1.5),
    ("top_k", 0),
    ("min_p", 1.5),
    ("repetition_penalty", 0.0),
    ("presence_penalty", 2.5),
    ("frequency_penalty", -2.5),
    ("seed", -1),
    ("max_tokens", 0),
    ("max_tokens", -2),  # -1 is "unset"; no other value below 1
    ("min_tokens", -1),
    ("stop", ["ok", ""]),
    ("stop_token_ids", [VOCAB]),
    ("logprobs", 21),
    # Past what the sampler's float32 tensors hold.
    ("temperature", 1e39),
    ("repetition_penalty", float("inf")),
    # Non-finite numbers: never a setting, always a client's arithmetic gone wrong.
    ("temperature", float("inf")),
    ("temperature", float("nan")),
    ("top_p", float("nan")),
    ("min_p", float("nan")),
    ("repetition_penalty", float("nan")),
    ("presence_penalty", float("inf")),
    ("frequency_penalty", float("nan")),
]


@pytest.mark.parametrize("top_k", [2**31, 2**63, 2**64 - 1])
def test_a_top_k_past_the_native_int32_is_refused_over_kserve(top_k: int) -> None:
    """The native field is int32; KServe's JSON and uint64 parameters carry more, which the
    sampler's int64 tensor could not even hold."""
    as_json = parse_infer_request(_kserve_request({"top_k": top_k}), MODEL).params
    request = _kserve_request({})
    del request.inputs[1]
    request.parameters["top_k"].uint64_param = top_k
    as_parameter = parse_infer_request(request, MODEL).params
    for params in (as_json, as_parameter):
        assert params.top_k == top_k
        with pytest.raises(InvalidRequestError) as info:
            params.validate(VOCAB)
        assert info.value.field == "top_k"


@pytest.mark.parametrize(("field", "value"), OUT_OF_RANGE)
def test_a_bad_field_is_named_alike_through_both_fronts(field: str, value: Any) -> None:
    """Each front's conversion, then the admission check the engine runs on its result (KServe
    refuses ``logprobs`` already in conversion: it has no output for them)."""
    fronts = (
        lambda: sampling_params_from_proto(_native_request(**{field: value})),
        lambda: parse_infer_request(_kserve_request({field: value}), MODEL).params,
    )
    for convert in fronts:
        with pytest.raises(InvalidRequestError) as info:
            convert().validate(VOCAB)
        assert info.value.field == field
