"""KServe v2 tensor encoding: request inputs to Python values, Python values to outputs.

The protocol carries a tensor's elements either in the typed ``contents`` fields or as raw
little-endian bytes in ``raw_input_contents`` / ``raw_output_contents`` (one entry per tensor,
in order). A BYTES element in raw form is a 4-byte little-endian length, then that many bytes.
Only the datatypes the generation model exchanges are decoded (BYTES, BOOL) or encoded
(BYTES, UINT32); anything else is refused by the model's input specification first.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pagedserve.backend.errors import InvalidRequestError

BYTES = "BYTES"
BOOL = "BOOL"
UINT32 = "UINT32"

_LENGTH_PREFIX = struct.Struct("<I")
_UINT32_MAX = 2**32 - 1


@dataclass(frozen=True)
class DecodedInput:
    """One request input: its declared datatype and shape and its flattened elements."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    values: list[Any]


def element_count(name: str, shape: Sequence[int]) -> int:
    """Elements a tensor of ``shape`` holds; a negative dimension is a malformed request."""
    if any(d < 0 for d in shape):
        raise InvalidRequestError(name, f"shape {list(shape)} has a negative dimension")
    return math.prod(shape)


def decode_raw_bytes(name: str, raw: bytes) -> list[bytes]:
    """Split a raw BYTES tensor into its elements (length-prefixed, back to back)."""
    items: list[bytes] = []
    pos = 0
    while pos < len(raw):
        if pos + _LENGTH_PREFIX.size > len(raw):
            raise InvalidRequestError(name, "raw BYTES data ends inside a 4-byte length prefix")
        (length,) = _LENGTH_PREFIX.unpack_from(raw, pos)
        pos += _LENGTH_PREFIX.size
        if pos + length > len(raw):
            raise InvalidRequestError(
                name, f"raw BYTES element of {length} bytes runs past the end of the data"
            )
        items.append(bytes(raw[pos : pos + length]))
        pos += length
    return items


def encode_raw_bytes(items: Sequence[bytes]) -> bytes:
    return b"".join(_LENGTH_PREFIX.pack(len(item)) + item for item in items)


def encode_raw_uint32(values: Sequence[int]) -> bytes:
    if any(not 0 <= v <= _UINT32_MAX for v in values):
        raise ValueError(f"UINT32 values out of range: {list(values)}")
    return struct.pack(f"<{len(values)}I", *values)


def _decode_raw(name: str, datatype: str, raw: bytes, count: int) -> list[Any]:
    if datatype == BYTES:
        values: list[Any] = decode_raw_bytes(name, raw)
    elif datatype == BOOL:
        values = [byte != 0 for byte in raw]
    else:
        raise InvalidRequestError(name, f"datatype {datatype} is not decoded by this server")
    if len(values) != count:
        raise InvalidRequestError(
            name, f"raw data holds {len(values)} {datatype} elements, shape needs {count}"
        )
    return values


def _decode_contents(name: str, datatype: str, contents: Any, count: int) -> list[Any]:
    if datatype == BYTES:
        values: list[Any] = [bytes(v) for v in contents.bytes_contents]
    elif datatype == BOOL:
        values = list(contents.bool_contents)
    else:
        raise InvalidRequestError(name, f"datatype {datatype} is not decoded by this server")
    if len(values) != count:
        raise InvalidRequestError(
            name, f"contents hold {len(values)} {datatype} elements, shape needs {count}"
        )
    return values


def decode_inputs(request: Any, datatypes: dict[str, str]) -> dict[str, DecodedInput]:
    """Decode every input of a ``ModelInferRequest`` whose name is in ``datatypes``.

    ``datatypes`` maps each accepted input name to the datatype it must have; the caller checks
    names and shapes first (with the model's own wording), this checks the data itself.
    """
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequestError(
            "raw_input_contents",
            f"holds {len(raw)} entries for {len(request.inputs)} inputs: "
            "give raw data for every input or for none",
        )
    decoded: dict[str, DecodedInput] = {}
    for index, tensor in enumerate(request.inputs):
        datatype = datatypes[tensor.name]
        count = element_count(tensor.name, tensor.shape)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidRequestError(
                    tensor.name, "data given both in contents and in raw_input_contents"
                )
            values = _decode_raw(tensor.name, datatype, raw[index], count)
        else:
            values = _decode_contents(tensor.name, datatype, tensor.contents, count)
        decoded[tensor.name] = DecodedInput(tensor.name, datatype, tuple(tensor.shape), values)
    return decoded
