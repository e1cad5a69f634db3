"""Membership rules: who may act, group size, receipt-mark advancement."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roost.core.membership import (
    ADMIN,
    MEMBER,
    Member,
    advance_marks,
    check_group_size,
    require_active,
    require_admin,
    require_visible,
)
from roost.protocol.errors import ErrorCode, ProtocolError

CONV = "g:0123456789abcdef"


def member(
    role: str = MEMBER, joined: int = 0, left: int | None = None, delivered: int = 0, read: int = 0
) -> Member:
    return Member("bob", role, joined, left, delivered, read)


def code_of(fn, *args) -> ErrorCode:  # type: ignore[no-untyped-def]
    with pytest.raises(ProtocolError) as info:
        fn(*args)
    return info.value.code


def test_active_and_visible_upto() -> None:
    current = member(joined=3)
    assert current.active
    assert current.visible_upto(10) == 10
    gone = member(joined=3, left=7)
    assert not gone.active
    assert gone.visible_upto(10) == 7
    assert gone.visible_upto(5) == 5  # never past the end of the conversation


def test_require_active() -> None:
    m = member()
    assert require_active(m, CONV) is m
    assert code_of(require_active, None, CONV) is ErrorCode.NOT_MEMBER
    assert code_of(require_active, member(left=4), CONV) is ErrorCode.NOT_MEMBER


def test_require_visible_allows_removed_members() -> None:
    gone = member(left=4)
    assert require_visible(gone, CONV) is gone
    assert code_of(require_visible, None, CONV) is ErrorCode.NOT_MEMBER


def test_require_admin() -> None:
    admin = member(role=ADMIN)
    assert require_admin(admin, CONV) is admin
    assert code_of(require_admin, member(role=MEMBER), CONV) is ErrorCode.FORBIDDEN
    # a removed admin is not a member at all any more
    assert code_of(require_admin, member(role=ADMIN, left=2), CONV) is ErrorCode.NOT_MEMBER
    assert code_of(require_admin, None, CONV) is ErrorCode.NOT_MEMBER


def test_check_group_size() -> None:
    check_group_size(0, 5, 5)
    check_group_size(3, 2, 5)
    check_group_size(5, 0, 5)
    assert code_of(check_group_size, 0, 6, 5) is ErrorCode.GROUP_FULL
    assert code_of(check_group_size, 5, 1, 5) is ErrorCode.GROUP_FULL


def test_marks_only_move_forward() -> None:
    m = member(delivered=5, read=3)
    assert advance_marks(m, 10, 4, None) == (5, 3)
    assert advance_marks(m, 10, 8, None) == (8, 3)
    assert advance_marks(m, 10, None, 2) == (5, 3)
    assert advance_marks(m, 10, None, None) == (5, 3)
    assert advance_marks(m, 10, 0, 0) == (5, 3)


def test_read_implies_delivered() -> None:
    m = member(delivered=2, read=1)
    assert advance_marks(m, 10, None, 7) == (7, 7)
    assert advance_marks(m, 10, 4, 7) == (7, 7)
    assert advance_marks(m, 10, 9, 7) == (9, 7)


def test_advance_does_not_mutate_the_member() -> None:
    m = member(delivered=2, read=1)
    advance_marks(m, 10, 5, 4)
    assert (m.delivered, m.read) == (2, 1)


def test_seq_past_the_end_is_invalid() -> None:
    m = member()
    assert advance_marks(m, 10, 10, 10) == (10, 10)
    assert code_of(advance_marks, m, 10, 11, None) is ErrorCode.INVALID
    assert code_of(advance_marks, m, 10, None, 11) is ErrorCode.INVALID


def test_removed_member_can_ack_only_up_to_its_removal() -> None:
    gone = member(left=6)
    assert advance_marks(gone, 20, 6, 6) == (6, 6)
    assert code_of(advance_marks, gone, 20, 7, None) is ErrorCode.INVALID
    assert code_of(advance_marks, gone, 20, None, 7) is ErrorCode.INVALID


@settings(max_examples=200, deadline=None)
@given(
    joined=st.integers(0, 50),
    d_extra=st.integers(0, 50),
    r_extra=st.integers(0, 50),
    last=st.integers(0, 200),
    left=st.none() | st.integers(0, 200),
    delivered=st.none() | st.integers(0, 250),
    read=st.none() | st.integers(0, 250),
)
def test_advance_marks_properties(
    joined: int,
    d_extra: int,
    r_extra: int,
    last: int,
    left: int | None,
    delivered: int | None,
    read: int | None,
) -> None:
    old_r = joined + r_extra
    old_d = old_r + d_extra
    m = Member("bob", MEMBER, joined, left, old_d, old_r)
    upto = m.visible_upto(last)
    past = any(s is not None and s > upto for s in (delivered, read))
    if past:
        assert code_of(advance_marks, m, last, delivered, read) is ErrorCode.INVALID
        return
    new_d, new_r = advance_marks(m, last, delivered, read)
    assert new_d >= old_d and new_r >= old_r  # forward only
    assert joined <= new_r <= new_d  # the documented invariant holds
    assert new_r == max(old_r, read or 0)
    assert new_d == max(old_d, delivered or 0, new_r)
    # idempotent: applying the same ack again changes nothing
    again = Member("bob", MEMBER, joined, left, new_d, new_r)
    assert advance_marks(again, last, delivered, read) == (new_d, new_r)
