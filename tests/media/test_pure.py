"""The pure parts of media, property-based: URL signatures, Range parsing, part plans."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roost.client.blobs import _plan
from roost.media import signing
from roost.media.base import StoredPart, check_parts
from roost.media.config import part_size_for
from roost.media.local import parse_range
from roost.protocol.frames import MAX_BLOB_PARTS
from roost.store.blobmeta import BlobRecord

KEY = b"k" * 32
FIELDS = st.tuples(
    st.sampled_from(["GET", "PUT"]),
    st.text("0123456789abcdef", min_size=32, max_size=32),
    st.integers(0, 1000),
    st.integers(0, 2**40),
    st.integers(0, 2**33),
)


@settings(deadline=None)  # a loaded CI machine must not fail a pure test on time
@given(FIELDS, FIELDS)
def test_a_signature_holds_for_exactly_what_it_signed(signed: tuple, used: tuple) -> None:  # type: ignore[type-arg]
    sig = signing.sign(KEY, *signed)
    now = min(signed[4], used[4])
    assert signing.verify(KEY, sig, *signed, now=now)
    assert signing.verify(KEY, sig, *used, now=now) == (used == signed)
    assert not signing.verify(KEY, sig, *signed, now=signed[4] + 1)  # expired
    assert not signing.verify(b"x" * 32, sig, *signed, now=now)  # another server's key


@settings(deadline=None)
@given(
    st.integers(0, 5000),
    st.one_of(st.none(), st.integers(0, 6000)),
    st.one_of(st.none(), st.integers(0, 6000)),
)
def test_a_single_range_is_read_as_rfc_9110_says(total: int, first: int | None, last: int | None) -> None:
    header = f"bytes={'' if first is None else first}-{'' if last is None else last}"
    got = parse_range(header, total)
    if first is None and last is None:
        assert got == "unsatisfiable"
        return
    if first is None:
        assert last is not None
        expected = (max(0, total - last), total - 1) if last > 0 and total > 0 else "unsatisfiable"
    else:
        end = total - 1 if last is None else min(last, total - 1)
        expected = (first, end) if first < total and end >= first else "unsatisfiable"
    assert got == expected
    if isinstance(got, tuple):
        assert 0 <= got[0] <= got[1] < total


def test_other_range_forms_get_the_whole_blob() -> None:
    assert parse_range(None, 10) is None
    assert parse_range("bytes=0-1,5-6", 10) is None
    assert parse_range("items=0-1", 10) is None


@settings(deadline=None)
@given(st.integers(1, 2**37), st.integers(64 * 1024, 64 * 2**20))
def test_parts_cover_the_blob_exactly_within_the_part_limit(size: int, configured: int) -> None:
    part_size = part_size_for(size, configured, MAX_BLOB_PARTS)
    rec = BlobRecord("a" * 32, "u", "file", size, part_size, "pending", 0)
    assert 1 <= rec.parts <= MAX_BLOB_PARTS
    lengths = [rec.part_length(p) for p in range(1, rec.parts + 1)]
    assert sum(lengths) == size and all(0 < n <= part_size for n in lengths)
    assert all(n == part_size for n in lengths[:-1])
    plan = _plan(size, part_size)
    assert [length for _, _, length in plan] == lengths
    assert [offset for _, offset, _ in plan] == [(p - 1) * part_size for p in range(1, rec.parts + 1)]


@pytest.mark.parametrize(
    "stored,given",
    [
        ({1: (10, "a")}, [(1, "a"), (2, "b")]),  # part 2 missing
        ({1: (10, "a"), 2: (4, "b")}, [(1, "a")]),  # part 2 not named
        ({1: (10, "a"), 2: (5, "b")}, [(1, "a"), (2, "b")]),  # last part 5 bytes, not 4
        ({1: (9, "a"), 2: (4, "b")}, [(1, "a"), (2, "b")]),  # first part short
        ({1: (10, "a"), 2: (4, "b")}, [(1, "a"), (2, "c")]),  # another etag
        ({1: (10, "a"), 2: (4, "b")}, [(1, "a"), (1, "a"), (2, "b")]),  # a part twice
    ],
)
def test_completion_needs_every_part_with_its_size_and_etag(
    stored: dict[int, tuple[int, str]], given: list[tuple[int, str]]
) -> None:
    rec = BlobRecord("a" * 32, "u", "file", 14, 10, "pending", 0)
    parts = {p: StoredPart(p, etag, size) for p, (size, etag) in stored.items()}
    with pytest.raises(Exception) as refused:
        check_parts(rec, parts, given)
    assert getattr(refused.value, "code", None) == "incomplete_upload"
    check_parts(rec, {1: StoredPart(1, "a", 10), 2: StoredPart(2, "b", 4)}, [(2, '"b"'), (1, "a")])
