"""Bearer tokens: how one is made and how it is stored.

The store keeps only a token's SHA-256, never the token. The chat service
hashes what a client presents; account tools (``roost user add``, the bulk
helpers of ``roost verify`` and ``roost bench``) hash what they hand out.
Both sides use this module, which sits below both.
"""

from __future__ import annotations

import hashlib
import secrets


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def new_token() -> str:
    # A fixed prefix: a token never starts with '-', which a command line
    # would take for an option.
    return "rt_" + secrets.token_urlsafe(24)
