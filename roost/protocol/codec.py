"""Bytes <-> frames. Pure functions, no I/O."""

from __future__ import annotations

import re

import msgspec

from roost.protocol.errors import ErrorCode, ProtocolError
from roost.protocol.frames import MAX_FRAME_BYTES, MAX_KEYS_FRAME_BYTES, ClientFrame, ServerFrame

_client_decoder = msgspec.json.Decoder(ClientFrame)
_server_decoder = msgspec.json.Decoder(ServerFrame)
_encoder = msgspec.json.Encoder()


class _TypeOnly(msgspec.Struct):
    type: str = ""


_type_decoder = msgspec.json.Decoder(_TypeOnly)


def _ref_of(data: bytes | str) -> str:
    """Best effort: the ``id``/``ref`` of a frame that failed validation."""
    try:
        raw = msgspec.json.decode(data)
    except (msgspec.DecodeError, RecursionError):
        return ""
    if isinstance(raw, dict):
        for key in ("ref", "id"):
            value = raw.get(key)
            if isinstance(value, str) and len(value) <= 64:
                return value
    return ""


def _over(data: bytes | str, limit: int) -> bool:
    # A str counts characters: up to 4 bytes each in UTF-8.
    return len(data) > limit or (
        isinstance(data, str) and len(data) * 4 > limit and len(data.encode()) > limit
    )


def _is_keys_put(data: bytes | str) -> bool:
    try:
        return _type_decoder.decode(data).type == "keys_put"
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return False


def decode_client(data: bytes | str) -> ClientFrame:
    """Decode one client frame or raise ``ProtocolError`` with a precise code."""
    # Only a keys_put may be larger (100 ML-KEM keys); the type is read only
    # for frames past the common limit, so other frames pay nothing.
    if _over(data, MAX_FRAME_BYTES) and (_over(data, MAX_KEYS_FRAME_BYTES) or not _is_keys_put(data)):
        raise ProtocolError(ErrorCode.TOO_LARGE, f"frame is over {MAX_FRAME_BYTES} bytes")
    try:
        return _client_decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise _classify(data, exc) from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"malformed JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError(ErrorCode.BAD_FRAME, "JSON nested too deeply") from None


def _classify(data: bytes | str, exc: msgspec.ValidationError) -> ProtocolError:
    ref = _ref_of(data)
    text = str(exc)
    try:
        kind = _type_decoder.decode(data).type
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
        return ProtocolError(ErrorCode.BAD_FRAME, f"not a frame object: {text}", ref)
    if not kind:
        return ProtocolError(ErrorCode.BAD_FRAME, "missing field 'type'", ref)
    if "Invalid value" in text and "$.type" in text:
        return ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {kind[:40]!r}", ref)
    if "$.body" in text and "length" in text:
        return ProtocolError(ErrorCode.TOO_LARGE, text, ref)
    if kind == "keys_put":
        return _classify_keys(text, ref)
    return ProtocolError(ErrorCode.BAD_FRAME, text, ref)


# Where a keys_put failed validation: a list of one-time keys itself (too
# long), or a field of a key (wrong length, base64 or id range).
_KEY_LIST = re.compile(r"at `\$\.(prekeys|kem_prekeys)`")
_KEY_FIELD = re.compile(r"at `\$\.(identity|signed|prekeys\[\d+\]|kem_prekeys\[\d+\]|last_resort)(\.(\w+))?`")


def _classify_keys(text: str, ref: str) -> ProtocolError:
    """The typed error of a keys_put the decoder refused."""
    if _KEY_LIST.search(text) and "length" in text:
        return ProtocolError(ErrorCode.TOO_MANY_KEYS, text, ref)
    field = _KEY_FIELD.search(text)
    if field is not None:
        if field.group(3) == "sig":
            return ProtocolError(ErrorCode.BAD_SIGNATURE, text, ref)
        if field.group(3) in (None, "key", "id"):
            return ProtocolError(ErrorCode.BAD_KEY, text, ref)
    return ProtocolError(ErrorCode.BAD_FRAME, text, ref)


def decode_server(data: bytes | str) -> ServerFrame:
    """Decode a server frame (used by the SDK). Raises msgspec errors."""
    return _server_decoder.decode(data)


def encode(frame: msgspec.Struct) -> bytes:
    return _encoder.encode(frame)
