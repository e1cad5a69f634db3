"""Who may do what in a conversation. Pure rules over member records."""

from __future__ import annotations

from dataclasses import dataclass

from roost.protocol.errors import ErrorCode, ProtocolError

ADMIN = "admin"
MEMBER = "member"
# The actor of a change made by the server's administrator (``roost user
# remove``), not by a member: no user name is empty.
ADMINISTRATOR = ""


@dataclass(slots=True)
class Member:
    """One user's standing in one conversation, plus its receipt marks.

    A member sees messages with ``joined < seq`` and, once removed,
    ``seq <= left``. ``delivered``/``read`` are cumulative seqs and
    ``joined <= read <= delivered`` holds at all times.
    """

    user: str
    role: str
    joined: int
    left: int | None
    delivered: int
    read: int

    @property
    def active(self) -> bool:
        return self.left is None

    def visible_upto(self, last_seq: int) -> int:
        return last_seq if self.left is None else min(self.left, last_seq)


def require_active(member: Member | None, conv: str) -> Member:
    if member is None or not member.active:
        raise ProtocolError(ErrorCode.NOT_MEMBER, f"not a member of {conv}")
    return member


def require_visible(member: Member | None, conv: str) -> Member:
    """Reading and acking stay allowed up to the point of removal."""
    if member is None:
        raise ProtocolError(ErrorCode.NOT_MEMBER, f"not a member of {conv}")
    return member


def require_admin(member: Member | None, conv: str) -> Member:
    member = require_active(member, conv)
    if member.role != ADMIN:
        raise ProtocolError(ErrorCode.FORBIDDEN, f"only an admin of {conv} can do that")
    return member


def check_group_size(current: int, adding: int, limit: int) -> None:
    if current + adding > limit:
        raise ProtocolError(
            ErrorCode.GROUP_FULL,
            f"a group holds at most {limit} members ({current} + {adding} requested)",
        )


def advance_marks(member: Member, last_seq: int, delivered: int | None, read: int | None) -> tuple[int, int]:
    """New ``(delivered, read)`` for an ack; marks only move forward, read implies delivered.

    Raises INVALID for a seq past what this member can ever see.
    """
    upto = member.visible_upto(last_seq)
    for seq in (delivered, read):
        if seq is not None and seq > upto:
            raise ProtocolError(ErrorCode.INVALID, f"seq {seq} is past the end ({upto})")
    new_read = max(member.read, read or 0)
    new_delivered = max(member.delivered, delivered or 0, new_read)
    return new_delivered, new_read
