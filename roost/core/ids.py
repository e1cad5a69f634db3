"""Conversation identifiers.

A 1:1 conversation's id is derived from its two members, so both sides (and a
retry) name the same conversation without a lookup: ``d:alice:bob`` with the
names sorted. A group's id is random: ``g:`` and 16 hex digits.
"""

from __future__ import annotations

import re
import secrets

_USER = re.compile(r"[a-z0-9_.\-]{1,32}")
_GROUP = re.compile(r"g:[0-9a-f]{16}")


def is_valid_user_name(name: str) -> bool:
    return bool(_USER.fullmatch(name))


def direct_conv_id(a: str, b: str) -> str:
    first, second = sorted((a, b))
    return f"d:{first}:{second}"


def direct_members(conv: str) -> tuple[str, str] | None:
    """The two members named by a 1:1 id, or None if ``conv`` is not one."""
    parts = conv.split(":")
    if len(parts) != 3 or parts[0] != "d":
        return None
    a, b = parts[1], parts[2]
    if not (is_valid_user_name(a) and is_valid_user_name(b)) or a >= b:
        return None
    return a, b


def is_group_id(conv: str) -> bool:
    return bool(_GROUP.fullmatch(conv))


def new_group_id() -> str:
    return "g:" + secrets.token_hex(8)
