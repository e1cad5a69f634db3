"""Errors of the Signal protocol core.

Every decryption failure is a DecryptError, so the SDK catches one class; the
subclasses say what the application should do differently (drop a duplicate
silently, warn about a changed identity, start a new session).
"""

from __future__ import annotations


class E2eeError(Exception):
    """Base class of every error raised by roost.e2ee."""


class DecryptError(E2eeError):
    """A message could not be decrypted: tampered, truncated, wrong key, unknown prekey, bad format."""


class DuplicateMessage(DecryptError):
    """The message was already decrypted (its key is used up); drop it silently."""


class InvalidSignature(DecryptError):
    """A signature (signed prekey, KEM prekey, sender key message) does not verify."""


class UnknownSession(DecryptError):
    """A PreKey message starts another session than this one (new base key): use Session.respond."""


class UntrustedIdentity(E2eeError):
    """The peer's identity key differs from the one trusted before (a reinstall or an attack)."""
