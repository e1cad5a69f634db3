"""The few protobuf fields libsignal's wire messages use: uint32 (varint) and bytes.

A serialiser, not crypto. Encoding writes fields in field-number order, as
prost does, so the bytes match libsignal's. Decoding checks every length
against the buffer, refuses varints longer than 10 bytes, uint32 values that
do not fit, and a known field with the wrong wire type; unknown fields are
skipped (protobuf's rule), also bounds-checked.
"""

from __future__ import annotations

from roost.e2ee.errors import DecryptError

VARINT = 0
FIXED64 = 1
LENGTH = 2
FIXED32 = 5

Field = int | bytes


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode(fields: list[tuple[int, Field]]) -> bytes:
    """Serialise (field number, value) pairs: an int as a uint32 varint, bytes as length-delimited."""
    out = bytearray()
    for number, value in fields:
        if isinstance(value, int):
            if not 0 <= value < 2**32:
                raise ValueError("uint32 out of range")
            out += _varint(number << 3 | VARINT) + _varint(value)
        else:
            out += _varint(number << 3 | LENGTH) + _varint(len(value)) + value
    return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        if pos >= len(data):
            raise DecryptError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if value >= 2**64:
                raise DecryptError("varint overflows 64 bits")
            return value, pos
    raise DecryptError("varint longer than 10 bytes")


def decode(data: bytes, schema: dict[int, int]) -> dict[int, Field]:
    """Parse a message whose known fields are ``schema`` {field number: VARINT or LENGTH}; last value wins."""
    fields: dict[int, Field] = {}
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise DecryptError("field number 0")
        expected = schema.get(number)
        if expected is not None and wire != expected:
            raise DecryptError(f"field {number} has wire type {wire}")
        if wire == VARINT:
            value, pos = _read_varint(data, pos)
            if expected is not None:
                if value >= 2**32:
                    raise DecryptError(f"field {number} does not fit in uint32")
                fields[number] = value
        elif wire == LENGTH:
            length, pos = _read_varint(data, pos)
            if length > len(data) - pos:
                raise DecryptError(f"field {number} runs past the end")
            if expected is not None:
                fields[number] = data[pos : pos + length]
            pos += length
        elif wire in (FIXED64, FIXED32):
            pos += 8 if wire == FIXED64 else 4
            if pos > len(data):
                raise DecryptError("truncated fixed-width field")
        else:
            raise DecryptError(f"unsupported wire type {wire}")
    return fields
