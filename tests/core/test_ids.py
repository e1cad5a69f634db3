"""Conversation ids."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from roost.core.ids import (
    direct_conv_id,
    direct_members,
    is_group_id,
    is_valid_user_name,
    new_group_id,
)
from roost.protocol import frames as f

user_names = st.from_regex(r"\A[a-z0-9_.\-]{1,32}\Z")


@pytest.mark.parametrize("name", ["a", "alice", "bob_2", "x.y-z", "0", "a" * 32])
def test_valid_user_names(name: str) -> None:
    assert is_valid_user_name(name)


@pytest.mark.parametrize("name", ["", "Alice", "a b", "a:b", "a" * 33, "é", "a/b", "g:0123"])
def test_invalid_user_names(name: str) -> None:
    assert not is_valid_user_name(name)


def test_trailing_newline_is_not_a_valid_name_or_id() -> None:
    """``$`` matches before a trailing newline: the checks must anchor at the very end."""
    assert not is_valid_user_name("bob\n")
    assert direct_members("d:alice:bob\n") is None
    assert not is_group_id("g:0123456789abcdef\n")


def test_direct_conv_id_is_symmetric_and_sorted() -> None:
    assert direct_conv_id("bob", "alice") == "d:alice:bob"
    assert direct_conv_id("alice", "bob") == "d:alice:bob"
    assert direct_members("d:alice:bob") == ("alice", "bob")


@pytest.mark.parametrize(
    "conv",
    [
        "d:bob:alice",  # not sorted
        "d:alice:alice",  # a 1:1 with oneself
        "d:alice",
        "d:alice:bob:carol",
        "x:alice:bob",
        "d:Alice:bob",
        "d::bob",
        "g:0123456789abcdef",
        "",
    ],
)
def test_direct_members_rejects_non_direct_ids(conv: str) -> None:
    assert direct_members(conv) is None


@settings(max_examples=200, deadline=None)
@given(user_names, user_names)
def test_direct_id_round_trips(a: str, b: str) -> None:
    assume(a != b)
    conv = direct_conv_id(a, b)
    assert conv == direct_conv_id(b, a)
    assert direct_members(conv) == tuple(sorted((a, b)))
    assert not is_group_id(conv)
    assert 3 <= len(conv) <= 80  # fits the wire ConvId limits


def test_group_ids() -> None:
    ids = {new_group_id() for _ in range(200)}
    assert len(ids) == 200
    for gid in ids:
        assert is_group_id(gid)
        assert direct_members(gid) is None
        assert len(gid) == 18
    assert f.GroupInfo(group=next(iter(ids))).group in ids


@pytest.mark.parametrize(
    "conv", ["g:0123456789ABCDEF", "g:0123456789abcde", "g:0123456789abcdef0", "d:a:b", "g:"]
)
def test_not_group_ids(conv: str) -> None:
    assert not is_group_id(conv)
