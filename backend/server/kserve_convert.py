"""The generation model's KServe tensors, following the conventions of Triton's vLLM backend.

Clients written for a Triton + vLLM deployment work unchanged:

- ``text_input`` (BYTES [1], required): the prompt.
- ``stream`` (BOOL [1]): deltas as they are produced (decoupled streaming) instead of one
  response at the end.
- ``sampling_parameters`` (BYTES [1]): a JSON object of sampling parameters; values may also be
  strings (``{"temperature": "0", "max_tokens": "8"}``). Without it, the request's
  ``parameters`` map is read for the same keys.
- ``exclude_input_in_output`` (BOOL [1]): without streaming the output is prompt + completion
  unless this is true; with streaming only the completion is sent (asking for the prompt then
  is an error).
- ``return_finish_reason``, ``return_num_input_tokens``, ``return_num_output_tokens``
  (BOOL [1]): add the ``finish_reason`` (BYTES, ``"None"`` until the last response),
  ``num_input_tokens`` and ``num_output_tokens`` (UINT32; tokens in this response) outputs.
- Sampling parameters are ``SUPPORTED_SAMPLING_PARAMETERS``; any other name set, ``logprobs`` and
  ``detokenize`` included (no output tensor carries logprobs or token ids), is refused with that
  list rather than ignored.
- ``n`` (a sampling parameter, default 1): choices for the prompt, prefilled once. Every
  response then carries ``text_output``, ``finish_reason`` and ``num_output_tokens`` of shape
  ``[n]``, one entry per choice: a streamed response holds one choice's delta and empty
  entries for the others (a choice that has finished keeps its reason), and the request's
  last response is the one after which every choice has finished.

Outputs always travel in ``raw_output_contents``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pagedserve.backend.engine.request import FinishReason
from pagedserve.backend.errors import InvalidRequestError
from pagedserve.backend.sampling_params import SamplingParams
from pagedserve.backend.server import kserve_protocol as kp
from pagedserve.backend.server.choices import checked_num_choices
from pagedserve.backend.server.kserve_tensors import (
    BOOL,
    BYTES,
    UINT32,
    DecodedInput,
    decode_inputs,
    encode_raw_bytes,
    encode_raw_uint32,
)
from pagedserve.backend.server.translate import SAMPLING_FIELDS, Coercion, build_sampling_params

TEXT_INPUT = "text_input"
STREAM = "stream"
SAMPLING_PARAMETERS = "sampling_parameters"
EXCLUDE_INPUT_IN_OUTPUT = "exclude_input_in_output"
RETURN_FINISH_REASON = "return_finish_reason"
RETURN_NUM_INPUT_TOKENS = "return_num_input_tokens"
RETURN_NUM_OUTPUT_TOKENS = "return_num_output_tokens"

TEXT_OUTPUT = "text_output"
FINISH_REASON = "finish_reason"
NUM_INPUT_TOKENS = "num_input_tokens"
NUM_OUTPUT_TOKENS = "num_output_tokens"

# Request parameter: send the final flag on an empty response of its own.
ENABLE_EMPTY_FINAL_RESPONSE = "triton_enable_empty_final_response"
# Response parameter on every streamed response: is it the request's last one?
FINAL_RESPONSE = "triton_final_response"
# What finish_reason says while the request is still running.
NOT_FINISHED = "None"
# Request-level controls of the protocol itself, never sampling parameters.
PROTOCOL_PARAMETERS = frozenset(
    {
        "sequence_id",
        "sequence_start",
        "sequence_end",
        "priority",
        "timeout",
        "binary_data_output",
        "headers",
        ENABLE_EMPTY_FINAL_RESPONSE,
    }
)
_RESERVED_PREFIX = "triton_"
# Engine sampling fields whose effect no output tensor of this model could show.
_UNSUPPORTED_SAMPLING_FIELDS = frozenset({"logprobs", "detokenize"})
SUPPORTED_SAMPLING_PARAMETERS: tuple[str, ...] = tuple(
    sorted((set(SAMPLING_FIELDS) - _UNSUPPORTED_SAMPLING_FIELDS) | {"n"})
)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the model's signature; ``dims`` has no batch dimension (-1: any size)."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    optional: bool = False

    @property
    def config_data_type(self) -> str:
        """The model-configuration enum name (BYTES is TYPE_STRING there)."""
        return "TYPE_STRING" if self.datatype == BYTES else f"TYPE_{self.datatype}"


INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec(TEXT_INPUT, BYTES, (1,)),
    TensorSpec(STREAM, BOOL, (1,), optional=True),
    TensorSpec(SAMPLING_PARAMETERS, BYTES, (1,), optional=True),
    TensorSpec(EXCLUDE_INPUT_IN_OUTPUT, BOOL, (1,), optional=True),
    TensorSpec(RETURN_FINISH_REASON, BOOL, (1,), optional=True),
    TensorSpec(RETURN_NUM_INPUT_TOKENS, BOOL, (1,), optional=True),
    TensorSpec(RETURN_NUM_OUTPUT_TOKENS, BOOL, (1,), optional=True),
)
OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec(TEXT_OUTPUT, BYTES, (-1,)),
    TensorSpec(FINISH_REASON, BYTES, (-1,)),
    TensorSpec(NUM_INPUT_TOKENS, UINT32, (1,)),
    TensorSpec(NUM_OUTPUT_TOKENS, UINT32, (-1,)),
)
_INPUTS_BY_NAME = {spec.name: spec for spec in INPUTS}
_OUTPUTS_BY_NAME = {spec.name: spec for spec in OUTPUTS}
# Which output each return_* input switches on.
_OPTIONAL_OUTPUTS = {
    RETURN_FINISH_REASON: FINISH_REASON,
    RETURN_NUM_INPUT_TOKENS: NUM_INPUT_TOKENS,
    RETURN_NUM_OUTPUT_TOKENS: NUM_OUTPUT_TOKENS,
}


@dataclass(frozen=True)
class InferRequest:
    """A validated ``ModelInferRequest`` in the engine's terms."""

    id: str
    prompt: str
    stream: bool
    # Without streaming, text_output starts with the prompt (vLLM backend default).
    prepend_prompt: bool
    params: SamplingParams
    # Choices for the prompt (the ``n`` sampling parameter).
    n: int
    # Output names this request gets, in the model's output order.
    outputs: tuple[str, ...]
    empty_final_response: bool


@dataclass(frozen=True)
class ResponseContent:
    """What one response reports for one choice of a request."""

    text: str
    finish_reason: FinishReason | None
    num_input_tokens: int
    num_output_tokens: int


# ---- sampling parameters --------------------------------------------------------------------


def parameter_value(parameter: Any) -> Any:
    """The Python value of an ``InferParameter`` (None when no member of the oneof is set)."""
    which = parameter.WhichOneof("parameter_choice")
    return None if which is None else getattr(parameter, which)


def _sampling_values_from_parameters(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters map less the protocol's own controls (Triton reserves ``triton_*``)."""
    values: dict[str, Any] = {}
    for key, parameter in parameters.items():
        if key in PROTOCOL_PARAMETERS:
            continue
        if key.startswith(_RESERVED_PREFIX):
            raise InvalidRequestError(
                key, f"parameter names starting with {_RESERVED_PREFIX!r} are reserved"
            )
        values[key] = parameter_value(parameter)
    return values


def _sampling_values_from_json(raw: bytes) -> dict[str, Any]:
    try:
        values = json.loads(raw.decode("utf-8"))
    # ValueError: also a number of more digits than Python converts (4300); RecursionError:
    # arrays or objects nested deeper than the parser's stack.
    except (ValueError, RecursionError) as error:
        raise InvalidRequestError(SAMPLING_PARAMETERS, f"is not valid JSON: {error}") from None
    if not isinstance(values, dict):
        raise InvalidRequestError(
            SAMPLING_PARAMETERS, f"must be a JSON object, got {type(values).__name__}"
        )
    return values


def _num_choices(value: Any) -> int:
    """The ``n`` parameter: an integer, possibly as text like every other value here."""
    if value is None:
        return checked_num_choices(None)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise InvalidRequestError("n", f"must be an integer, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError("n", f"must be an integer, got {value!r}")
    return checked_num_choices(value)


def _refuse_unsupported(values: Mapping[str, Any]) -> None:
    """A parameter this API would ignore is an error: the client must not believe it took.
    A null value is an absent one, as everywhere in the translation."""
    for name, value in values.items():
        if name not in SUPPORTED_SAMPLING_PARAMETERS and value is not None:
            raise InvalidRequestError(
                name,
                "is not a supported sampling parameter of this model "
                f"(supported: {', '.join(SUPPORTED_SAMPLING_PARAMETERS)})",
            )


def _sampling_params(
    request: Any, inputs: Mapping[str, DecodedInput]
) -> tuple[SamplingParams, int]:
    """From the ``sampling_parameters`` tensor, else from the request's parameters map (the
    tensor wins, as in the vLLM backend), and the number of choices. Either may hold numbers
    and flags as text (``{"max_tokens": "8"}``), hence the text coercion."""
    if SAMPLING_PARAMETERS in inputs:
        values = _sampling_values_from_json(inputs[SAMPLING_PARAMETERS].values[0])
    else:
        values = _sampling_values_from_parameters(request.parameters)
    _refuse_unsupported(values)
    n = _num_choices(values.pop("n", None))
    return build_sampling_params(values, coercion=Coercion.TEXT), n


# ---- requests -------------------------------------------------------------------------------


def _check_signature(request: Any, model_name: str) -> None:
    """Names, datatypes and shapes against the model's inputs, worded as Triton words them."""
    seen: set[str] = set()
    for tensor in request.inputs:
        spec = _INPUTS_BY_NAME.get(tensor.name)
        if spec is None:
            raise InvalidRequestError(
                tensor.name,
                f"unexpected inference input {tensor.name!r} for model {model_name!r} "
                f"(inputs: {', '.join(_INPUTS_BY_NAME)})",
            )
        if tensor.name in seen:
            raise InvalidRequestError(tensor.name, "input given more than once")
        seen.add(tensor.name)
        if tensor.datatype != spec.datatype:
            raise InvalidRequestError(
                tensor.name,
                f"unexpected datatype {tensor.datatype!r} for inference input {tensor.name!r}, "
                f"expecting {spec.datatype} for model {model_name!r}",
            )
        if tuple(tensor.shape) != spec.dims:
            raise InvalidRequestError(
                tensor.name,
                f"unexpected shape for input {tensor.name!r} for model {model_name!r}: "
                f"expected {list(spec.dims)}, got {list(tensor.shape)}",
            )
    missing = [spec.name for spec in INPUTS if not spec.optional and spec.name not in seen]
    if missing:
        raise InvalidRequestError(
            missing[0], f"missing required input(s) {missing} for model {model_name!r}"
        )


def _requested_outputs(request: Any, model_name: str, enabled: set[str]) -> tuple[str, ...]:
    requested = [output.name for output in request.outputs]
    for name in requested:
        if name not in _OUTPUTS_BY_NAME:
            raise InvalidRequestError(
                name, f"unexpected inference output {name!r} for model {model_name!r}"
            )
    wanted = set(requested) if requested else set(_OUTPUTS_BY_NAME)
    return tuple(spec.name for spec in OUTPUTS if spec.name in wanted and spec.name in enabled)


def parse_infer_request(request: Any, model_name: str) -> InferRequest:
    """Validate a ``ModelInferRequest`` for the generation model; InvalidRequestError names
    the offending input or parameter."""
    _check_signature(request, model_name)
    inputs = decode_inputs(
        request, {t.name: _INPUTS_BY_NAME[t.name].datatype for t in request.inputs}
    )

    def flag(name: str) -> bool | None:
        return bool(inputs[name].values[0]) if name in inputs else None

    try:
        prompt = inputs[TEXT_INPUT].values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequestError(TEXT_INPUT, "is not valid UTF-8") from None
    if not prompt:
        raise InvalidRequestError(TEXT_INPUT, "must not be empty")

    stream = flag(STREAM) or False
    exclude = flag(EXCLUDE_INPUT_IN_OUTPUT)
    prepend_prompt = not stream if exclude is None else not exclude
    if stream and prepend_prompt:
        raise InvalidRequestError(
            EXCLUDE_INPUT_IN_OUTPUT,
            "must not be false when streaming (deltas never repeat the prompt)",
        )

    params, n = _sampling_params(request, inputs)
    enabled = {TEXT_OUTPUT} | {
        out for flag_name, out in _OPTIONAL_OUTPUTS.items() if flag(flag_name)
    }
    empty_final = request.parameters.get(ENABLE_EMPTY_FINAL_RESPONSE)
    return InferRequest(
        id=request.id,
        prompt=prompt,
        stream=stream,
        prepend_prompt=prepend_prompt,
        params=params,
        n=n,
        outputs=_requested_outputs(request, model_name, enabled),
        empty_final_response=bool(empty_final is not None and parameter_value(empty_final)),
    )


# ---- responses ------------------------------------------------------------------------------


def build_response(
    request: InferRequest,
    contents: Sequence[ResponseContent],
    *,
    model_name: str,
    model_version: str,
    final: bool | None = None,
) -> Any:
    """A ``ModelInferResponse`` carrying the request's outputs (raw), one entry per choice
    (``contents``, in index order), and, when ``final`` is given, the
    ``triton_final_response`` parameter."""
    response = kp.ModelInferResponse(
        model_name=model_name, model_version=model_version, id=request.id
    )
    for name in request.outputs:
        spec = _OUTPUTS_BY_NAME[name]
        shape = len(contents)
        if name == TEXT_OUTPUT:
            raw = encode_raw_bytes([c.text.encode("utf-8") for c in contents])
        elif name == FINISH_REASON:
            raw = encode_raw_bytes([
                (NOT_FINISHED if c.finish_reason is None else c.finish_reason.value).encode("utf-8")
                for c in contents
            ])
        elif name == NUM_INPUT_TOKENS:
            raw = encode_raw_uint32([contents[0].num_input_tokens])
            shape = 1
        else:
            raw = encode_raw_uint32([c.num_output_tokens for c in contents])
        response.outputs.add(name=name, datatype=spec.datatype, shape=[shape])
        response.raw_output_contents.append(raw)
    if final is not None:
        response.parameters[FINAL_RESPONSE].bool_param = final
    return response


def empty_final_response(request: InferRequest, *, model_name: str, model_version: str) -> Any:
    """The output-less response that only says "no more responses for this request"."""
    response = kp.ModelInferResponse(
        model_name=model_name, model_version=model_version, id=request.id
    )
    response.parameters[FINAL_RESPONSE].bool_param = True
    return response
