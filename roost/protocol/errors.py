"""Stable error codes. Clients switch on ``code``; the message is for humans.

Codes never change meaning once released; new ones may be added.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    BAD_FRAME = "bad_frame"  # not JSON, wrong field types, missing fields
    UNKNOWN_TYPE = "unknown_type"  # JSON with a "type" this server does not know
    TOO_LARGE = "too_large"  # frame or body over the limit
    UNSUPPORTED_VERSION = "unsupported_version"
    AUTH_REQUIRED = "auth_required"  # a frame other than auth came first
    AUTH_FAILED = "auth_failed"
    AUTH_TIMEOUT = "auth_timeout"
    UNKNOWN_USER = "unknown_user"
    UNKNOWN_CONVERSATION = "unknown_conversation"
    NOT_MEMBER = "not_member"  # covers "acting in a conversation you are not in"
    FORBIDDEN = "forbidden"  # e.g. a non-admin changing membership
    GROUP_FULL = "group_full"
    INVALID = "invalid"  # well-formed but meaningless (seq past the end, to self, ...)
    UNAVAILABLE = "unavailable"  # the store failed; nothing was committed; retry
    # The key directory (keys_put / keys_get): a refused upload changes nothing.
    BAD_KEY = "bad_key"  # wrong length, type byte, base64 or key id
    BAD_SIGNATURE = "bad_signature"  # a signature that does not verify with the frame's identity key
    TOO_MANY_KEYS = "too_many_keys"  # over the per-frame or per-device stock limit
    DUPLICATE_KEY_ID = "duplicate_key_id"  # a one-time key id given twice or already stored
    NO_KEYS = "no_keys"  # the user has published no keys yet
    RATE_LIMITED = "rate_limited"  # too many bundle fetches or uploads started; retry later
    INTERNAL = "internal"
    ENCRYPTION_REQUIRED = "encryption_required"  # a message whose ct is not the end-to-end envelope
    # Media (blob_* frames)
    QUOTA_EXCEEDED = "quota_exceeded"  # the user's stored blobs would pass its byte quota
    UNKNOWN_BLOB = "unknown_blob"  # no such blob (or not complete, for blob_get)
    INCOMPLETE_UPLOAD = "incomplete_upload"  # blob_complete with a part missing or of the wrong size
    NOT_OWNER = "not_owner"  # acting on another user's upload


# Errors after which the same request may succeed if sent again unchanged.
RETRYABLE = frozenset({ErrorCode.UNAVAILABLE, ErrorCode.INTERNAL})


class ProtocolError(Exception):
    """A request the server refuses; becomes an ``error`` frame, changes nothing."""

    def __init__(self, code: ErrorCode, message: str, ref: str = "") -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.ref = ref


# WebSocket close codes (4000-4999 are for applications).
class CloseCode:
    NORMAL = 1000
    GOING_AWAY = 1001  # server shutting down: reconnect elsewhere / later
    POLICY = 1008
    TOO_BIG = 1009
    AUTH_FAILED = 4001
    AUTH_TIMEOUT = 4002
    REPLACED = 4003  # the same user connected again; this socket is superseded
    SLOW_CONSUMER = 4004  # could not keep up; messages wait in the inbox
    UNSUPPORTED_VERSION = 4005
    STORE_FAILED = 4006  # a send could not be committed; reconnect and resend in order
    SUPERSEDED = 4007  # a newer connection of this same client run took over; reconnect
    REVOKED = 4008  # the token was reset, or the account disabled or removed; stop
