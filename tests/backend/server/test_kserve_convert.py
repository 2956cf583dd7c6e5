"""KServe request parsing and response building, without a server.

Requests are built both by hand (typed ``contents``) and by tritonclient's own request builder
(raw contents), and responses are read back with tritonclient's ``InferResult``, so both ends
of the conversion are checked against the real client's encoding.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as triton_service
from tritonclient.grpc._utils import _get_inference_request

from pagedserve.backend.engine.request import FinishReason
from pagedserve.backend.errors import InvalidRequestError
from pagedserve.backend.sampling_params import SamplingParams
from pagedserve.backend.server import kserve_protocol as kp
from pagedserve.backend.server.kserve_convert import (
    FINAL_RESPONSE,
    SUPPORTED_SAMPLING_PARAMETERS,
    ResponseContent,
    build_response,
    empty_final_response,
    parse_infer_request,
)
from pagedserve.backend.server.kserve_tensors import (
    decode_raw_bytes,
    encode_raw_bytes,
    encode_raw_uint32,
)

MODEL = "tiny"


def triton_request(
    prompt: str | bytes | None = "Hello there",
    *,
    stream: bool | None = None,
    sampling: Any = None,
    exclude: bool | None = None,
    returns: tuple[str, ...] = (),
    parameters: dict[str, Any] | None = None,
    outputs: tuple[str, ...] = (),
    request_id: str = "r1",
    extra: list[grpcclient.InferInput] | None = None,
) -> Any:
    """A request exactly as tritonclient encodes it, parsed into our classes."""
    inputs = []
    if prompt is not None:
        data = prompt.encode() if isinstance(prompt, str) else prompt
        inputs.append(grpcclient.InferInput("text_input", [1], "BYTES"))
        inputs[-1].set_data_from_numpy(np.array([data], dtype=np.object_))
    flags = {"stream": stream, "exclude_input_in_output": exclude, **{r: True for r in returns}}
    for name, value in flags.items():
        if value is not None:
            inputs.append(grpcclient.InferInput(name, [1], "BOOL"))
            inputs[-1].set_data_from_numpy(np.array([value], dtype=bool))
    if sampling is not None:
        text = sampling if isinstance(sampling, (str, bytes)) else json.dumps(sampling)
        raw = text.encode() if isinstance(text, str) else text
        inputs.append(grpcclient.InferInput("sampling_parameters", [1], "BYTES"))
        inputs[-1].set_data_from_numpy(np.array([raw], dtype=np.object_))
    inputs.extend(extra or [])
    request = _get_inference_request(
        model_name=MODEL,
        inputs=inputs,
        model_version="",
        request_id=request_id,
        outputs=[grpcclient.InferRequestedOutput(name) for name in outputs] or None,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        parameters=parameters,
    )
    return kp.ModelInferRequest.FromString(request.SerializeToString())


def read_back(response: Any) -> grpcclient.InferResult:
    """Our response, decoded the way tritonclient decodes what it receives."""
    return grpcclient.InferResult(
        triton_service.ModelInferResponse.FromString(response.SerializeToString())
    )


# ---- tensors ----------------------------------------------------------------------------------


def test_raw_bytes_round_trip_matches_tritonclient_encoding() -> None:
    items = [b"", b"abc", "héllo".encode(), bytes(range(256))]
    ours = encode_raw_bytes(items)
    theirs = grpcclient.serialize_byte_tensor(np.array(items, dtype=np.object_)).item()
    assert ours == theirs
    assert decode_raw_bytes("t", ours) == items


@pytest.mark.parametrize("raw", [b"\x05\x00\x00\x00abc", b"\x01\x00"])
def test_truncated_raw_bytes_are_refused(raw: bytes) -> None:
    with pytest.raises(InvalidRequestError) as info:
        decode_raw_bytes("text_input", raw)
    assert info.value.field == "text_input"


def test_uint32_encoding_is_little_endian_and_range_checked() -> None:
    assert encode_raw_uint32([1, 258]) == b"\x01\x00\x00\x00\x02\x01\x00\x00"
    with pytest.raises(ValueError):
        encode_raw_uint32([-1])


# ---- request parsing ----------------------------------------------------------------------


def test_defaults_follow_the_vllm_backend() -> None:
    parsed = parse_infer_request(triton_request(), MODEL)
    assert parsed.prompt == "Hello there" and parsed.id == "r1"
    assert parsed.stream is False
    assert parsed.prepend_prompt is True  # not streaming: prompt + completion
    assert parsed.params == SamplingParams()
    assert parsed.outputs == ("text_output",)
    assert parsed.empty_final_response is False


def test_streaming_sends_only_the_completion() -> None:
    assert parse_infer_request(triton_request(stream=True), MODEL).prepend_prompt is False
    assert (
        parse_infer_request(triton_request(stream=True, exclude=True), MODEL).prepend_prompt
        is False
    )
    assert parse_infer_request(triton_request(exclude=True), MODEL).prepend_prompt is False
    assert parse_infer_request(triton_request(exclude=False), MODEL).prepend_prompt is True
    with pytest.raises(InvalidRequestError) as info:
        parse_infer_request(triton_request(stream=True, exclude=False), MODEL)
    assert info.value.field == "exclude_input_in_output"


def test_sampling_parameters_json_accepts_strings() -> None:
    sampling = {
        "temperature": "0",
        "top_p": "0.9",
        "top_k": "5",
        "max_tokens": "7",
        "seed": "11",
        "ignore_eos": "true",
        "stop": "\n",
        "stop_token_ids": "[2, 3]",
        "min_tokens": 2,
        "repetition_penalty": 1.1,
        "logprobs": None,
    }
    params = parse_infer_request(triton_request(sampling=sampling), MODEL).params
    assert params == SamplingParams(
        temperature=0.0,
        top_p=0.9,
        top_k=5,
        max_tokens=7,
        seed=11,
        ignore_eos=True,
        stop=["\n"],
        stop_token_ids=[2, 3],
        min_tokens=2,
        repetition_penalty=1.1,
    )


def test_request_parameters_carry_sampling_when_no_tensor_does() -> None:
    request = triton_request(
        parameters={"temperature": 0.0, "max_tokens": 3, "top_k": "4", "ignore_eos": True}
    )
    params = parse_infer_request(request, MODEL).params
    assert (params.temperature, params.max_tokens, params.top_k, params.ignore_eos) == (
        0.0,
        3,
        4,
        True,
    )
    # The tensor wins over the parameters map, as in the vLLM backend.
    both = triton_request(sampling={"max_tokens": 9}, parameters={"max_tokens": 3})
    assert parse_infer_request(both, MODEL).params.max_tokens == 9


def test_protocol_parameters_are_not_sampling_parameters() -> None:
    request = triton_request()
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    request.parameters["priority"].uint64_param = 1
    parsed = parse_infer_request(request, MODEL)
    assert parsed.empty_final_response is True
    assert parsed.params == SamplingParams()
    request.parameters["triton_something"].bool_param = True
    with pytest.raises(InvalidRequestError, match="reserved"):
        parse_infer_request(request, MODEL)


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        ("{not json", "sampling_parameters"),
        (b"\xff\xfe", "sampling_parameters"),
        ("[1, 2]", "sampling_parameters"),
        ({"temperature": "warm"}, "temperature"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"ignore_eos": "maybe"}, "ignore_eos"),
        ({"stop": 3}, "stop"),
        ({"stop_token_ids": "x"}, "stop_token_ids"),
        ({"best_of": 2}, "best_of"),
        # Nested deeper than the JSON parser's stack, and a number of more digits than
        # Python converts from text: not JSON this server reads, not a server failure.
        ("[" * 50_000 + "]" * 50_000, "sampling_parameters"),
        ('{"stop_token_ids": ' + "[" * 50_000 + "]" * 50_000 + "}", "sampling_parameters"),
        ('{"a": ' * 50_000 + "1" + "}" * 50_000, "sampling_parameters"),
        ('{"max_tokens": ' + "9" * 5000 + "}", "sampling_parameters"),
    ],
)
def test_bad_sampling_parameters_name_the_field(sampling: Any, field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_infer_request(triton_request(sampling=sampling), MODEL)
    assert info.value.field == field


def test_every_supported_sampling_field_is_accepted_by_name() -> None:
    defaults = SamplingParams()
    values = {
        name: getattr(defaults, name)
        for name in defaults.__dataclass_fields__
        if name in SUPPORTED_SAMPLING_PARAMETERS
    }
    assert set(values) | {"n"} == set(SUPPORTED_SAMPLING_PARAMETERS)
    assert parse_infer_request(triton_request(sampling=values), MODEL).params == defaults


@pytest.mark.parametrize(
    ("name", "value"), [("logprobs", 2), ("logprobs", 0), ("detokenize", False), ("beam_width", 2)]
)
@pytest.mark.parametrize("carrier", ["sampling", "parameters"])
def test_parameters_no_output_could_show_are_refused_listing_the_supported(
    name: str, value: Any, carrier: str
) -> None:
    request = triton_request(**{carrier: {name: value}})
    with pytest.raises(InvalidRequestError) as info:
        parse_infer_request(request, MODEL)
    assert info.value.field == name
    assert "not a supported sampling parameter" in info.value.message
    assert all(supported in info.value.message for supported in SUPPORTED_SAMPLING_PARAMETERS)


def _tensor_input(
    name: str, datatype: str, shape: list[int], data: np.ndarray
) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, shape, datatype)
    tensor.set_data_from_numpy(data)
    return tensor


@pytest.mark.parametrize(
    ("request_factory", "field", "message"),
    [
        (lambda: triton_request(None), "text_input", "missing required input"),
        (lambda: triton_request(""), "text_input", "must not be empty"),
        (lambda: triton_request(b"\xff"), "text_input", "UTF-8"),
        (
            lambda: triton_request(
                None,
                extra=[_tensor_input("text_input", "INT32", [1], np.array([1], dtype=np.int32))],
            ),
            "text_input",
            "unexpected datatype",
        ),
        (
            lambda: triton_request(
                None,
                extra=[
                    _tensor_input(
                        "text_input", "BYTES", [2], np.array([b"a", b"b"], dtype=np.object_)
                    )
                ],
            ),
            "text_input",
            "unexpected shape",
        ),
        (
            lambda: triton_request(
                extra=[_tensor_input("stream", "BYTES", [1], np.array([b"yes"], dtype=np.object_))]
            ),
            "stream",
            "unexpected datatype",
        ),
        (
            lambda: triton_request(
                extra=[_tensor_input("image", "BYTES", [1], np.array([b"x"], dtype=np.object_))]
            ),
            "image",
            "unexpected inference input",
        ),
        (lambda: triton_request(outputs=("logits",)), "logits", "unexpected inference output"),
    ],
)
def test_bad_inputs_name_the_tensor(request_factory: Any, field: str, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message) as info:
        parse_infer_request(request_factory(), MODEL)
    assert info.value.field == field


def test_typed_contents_are_read_like_raw_contents() -> None:
    request = kp.ModelInferRequest(model_name=MODEL, id="c")
    text = request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    text.contents.bytes_contents.append(b"Hi")
    flag = request.inputs.add(name="exclude_input_in_output", datatype="BOOL", shape=[1])
    flag.contents.bool_contents.append(True)
    sampling = request.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1])
    sampling.contents.bytes_contents.append(b'{"max_tokens": 4}')
    parsed = parse_infer_request(request, MODEL)
    assert (parsed.prompt, parsed.prepend_prompt, parsed.params.max_tokens) == ("Hi", False, 4)
    # Element counts must match the shape in typed contents too.
    text.contents.bytes_contents.append(b"again")
    with pytest.raises(InvalidRequestError, match="elements"):
        parse_infer_request(request, MODEL)


def test_raw_contents_must_cover_every_input() -> None:
    request = triton_request(stream=True)
    del request.raw_input_contents[-1]
    with pytest.raises(InvalidRequestError) as info:
        parse_infer_request(request, MODEL)
    assert info.value.field == "raw_input_contents"


# ---- responses ----------------------------------------------------------------------------


def test_response_outputs_read_back_with_tritonclient() -> None:
    request = parse_infer_request(
        triton_request(
            returns=("return_finish_reason", "return_num_input_tokens", "return_num_output_tokens")
        ),
        MODEL,
    )
    assert request.outputs == (
        "text_output",
        "finish_reason",
        "num_input_tokens",
        "num_output_tokens",
    )
    content = ResponseContent(
        "Bonjour ✓", FinishReason.LENGTH, num_input_tokens=5, num_output_tokens=3
    )
    result = read_back(
        build_response(request, [content], model_name=MODEL, model_version="1", final=True)
    )
    assert result.as_numpy("text_output").tolist() == ["Bonjour ✓".encode()]
    assert result.as_numpy("finish_reason").tolist() == [b"length"]
    assert result.as_numpy("num_input_tokens").tolist() == [5]
    assert result.as_numpy("num_output_tokens").tolist() == [3]
    response = result.get_response()
    assert response.id == "r1" and response.model_name == MODEL
    assert response.parameters[FINAL_RESPONSE].bool_param is True


def test_running_request_reports_finish_reason_none_and_only_requested_outputs() -> None:
    request = parse_infer_request(
        triton_request(returns=("return_finish_reason",), outputs=("finish_reason",)), MODEL
    )
    assert request.outputs == ("finish_reason",)
    content = ResponseContent("x", None, num_input_tokens=1, num_output_tokens=1)
    result = read_back(
        build_response(request, [content], model_name=MODEL, model_version="1", final=False)
    )
    assert result.as_numpy("text_output") is None
    assert result.as_numpy("finish_reason").tolist() == [b"None"]
    assert result.get_response().parameters[FINAL_RESPONSE].bool_param is False


def test_unary_response_has_no_final_flag_and_empty_final_has_no_outputs() -> None:
    request = parse_infer_request(triton_request(), MODEL)
    content = ResponseContent("x", FinishReason.STOP, 1, 1)
    unary = build_response(request, [content], model_name=MODEL, model_version="1")
    assert FINAL_RESPONSE not in unary.parameters
    empty = empty_final_response(request, model_name=MODEL, model_version="1")
    assert len(empty.outputs) == 0 and len(empty.raw_output_contents) == 0
    assert empty.id == "r1" and empty.parameters[FINAL_RESPONSE].bool_param is True
