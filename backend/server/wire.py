"""Request deserializers that turn unparsable bytes into an answerable request.

protobuf's parser rejects a ``string`` field holding invalid UTF-8 before any handler runs, and
gRPC would then fail the call with a generic error. These deserializers return an
``UndecodableRequest`` instead, so the handler can answer INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, cast

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

M = TypeVar("M", bound=Message)

# Protobuf wire types (the low three bits of a field key).
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


@dataclass(frozen=True)
class UndecodableRequest:
    """Stands in for a request whose bytes did not parse. ``field`` is the bad field's path
    (``"prompt"``, ``"messages.content"``) when it could be found, else ``"request"``."""

    field: str
    reason: str


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        byte = data[pos]  # IndexError on truncation: the caller treats it as "not found"
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def find_invalid_utf8(data: bytes, descriptor: Descriptor) -> str | None:
    """Path of the first ``string`` field holding invalid UTF-8, or None.

    Walks the wire format with the message descriptor, descending into sub-messages. A wrapper
    level whose field repeats the outer name (``messages.messages``) is folded into one.
    """
    pos = 0
    try:
        while pos < len(data):
            key, pos = _read_varint(data, pos)
            number, wire_type = key >> 3, key & 0x7
            if wire_type == _VARINT:
                _, pos = _read_varint(data, pos)
            elif wire_type == _FIXED64:
                pos += 8
            elif wire_type == _FIXED32:
                pos += 4
            elif wire_type == _LENGTH_DELIMITED:
                length, pos = _read_varint(data, pos)
                chunk, pos = data[pos : pos + length], pos + length
                field = descriptor.fields_by_number.get(number)
                if field is None:
                    continue
                if field.type == FieldDescriptor.TYPE_STRING:
                    try:
                        chunk.decode("utf-8")
                    except UnicodeDecodeError:
                        return field.name
                elif field.type == FieldDescriptor.TYPE_MESSAGE:
                    inner = find_invalid_utf8(chunk, field.message_type)
                    if inner is not None:
                        folded = inner.split(".", 1)[0] == field.name
                        return inner if folded else f"{field.name}.{inner}"
            else:  # groups are not used by our protocol; stop looking
                return None
    except IndexError:
        return None
    return None


def tolerant_deserializer(message_type: type[M]) -> Callable[[bytes], M | UndecodableRequest]:
    """A gRPC request deserializer for ``message_type`` that never raises on bad bytes."""

    def deserialize(data: bytes) -> M | UndecodableRequest:
        try:
            return message_type.FromString(data)
        except DecodeError as error:
            # The stubs type DESCRIPTOR as the pure-Python or the upb class; both walk alike.
            field = find_invalid_utf8(data, cast(Descriptor, message_type.DESCRIPTOR))
            if field is not None:
                return UndecodableRequest(field, "is not valid UTF-8")
            return UndecodableRequest("request", f"cannot be parsed ({error})")

    return deserialize
