"""Reading one conversation's inbox page through the batched store call."""

from __future__ import annotations

from typing import Any

from roost.core.delivery import DrainRequest
from roost.protocol.errors import ProtocolError
from roost.store.base import DrainPage


async def read_inbox(store: Any, user: str, conv: str, after: int | None, limit: int) -> DrainPage:
    """One conversation's inbox page through ``read_inboxes``; refusals raise."""
    [page] = await store.read_inboxes(user, [DrainRequest(conv, after, limit)], limit)
    if isinstance(page, ProtocolError):
        raise page
    return page
