"""Sans-I/O Signal protocol for Roost's end-to-end encryption.

No sockets, files or event loop: state objects in, bytes out. The caller
persists each state object (to_bytes) in the same transaction as the message
it encrypted or decrypted. Specs followed and formats: docs/security.md.
"""

from roost.e2ee.errors import (
    DecryptError,
    DuplicateMessage,
    E2eeError,
    InvalidSignature,
    UnknownSession,
    UntrustedIdentity,
)
from roost.e2ee.fingerprint import fingerprint_digits, safety_number
from roost.e2ee.keys import LocalKeys
from roost.e2ee.ratchet import DeviceBundleLike, Session
from roost.e2ee.sender_keys import SenderKeyRecord

__all__ = [
    "DecryptError",
    "DeviceBundleLike",
    "DuplicateMessage",
    "E2eeError",
    "InvalidSignature",
    "LocalKeys",
    "SenderKeyRecord",
    "Session",
    "UnknownSession",
    "UntrustedIdentity",
    "fingerprint_digits",
    "safety_number",
]
