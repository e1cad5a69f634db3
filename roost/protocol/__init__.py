"""The wire protocol: typed frames, the JSON codec and error codes. No I/O here."""

from roost.protocol.codec import decode_client, decode_server, encode
from roost.protocol.errors import CloseCode, ErrorCode, ProtocolError
from roost.protocol.frames import PROTOCOL_VERSION

__all__ = [
    "PROTOCOL_VERSION",
    "CloseCode",
    "ErrorCode",
    "ProtocolError",
    "decode_client",
    "decode_server",
    "encode",
]
