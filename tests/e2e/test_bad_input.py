"""Hostile and broken input over a raw WebSocket.

Every bad frame gets a typed error (never a crash, never a silent drop), the
connection stays usable unless the protocol says it closes, and nothing is
stored: afterwards a normal send gets the next contiguous seq and the history
holds no extra message.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest

from tests.e2e.helpers import Closed, RawWS, add_users, b64, healthz, unb64
from tests.e2e.server import ServerProcess

CONV = "d:alice:bob"
OTHER = "d:bob:carol"


class Alice:
    """alice's raw connection plus what the store should hold in ``CONV``."""

    def __init__(self, srv: ServerProcess, raw: RawWS) -> None:
        self.srv = srv
        self.raw = raw
        self.stored: list[str] = []  # bodies alice stored in CONV, in seq order

    async def send_ok(self) -> None:
        text = f"ok-{len(self.stored) + 1}"
        await self.raw.send({"type": "send", "id": text, "to": "bob", "body": b64(text)})
        ack = await self.raw.recv(10)
        assert ack["type"] == "ack", ack
        assert (ack["conv"], ack["seq"], ack.get("duplicate", False)) == (CONV, len(self.stored) + 1, False)
        self.stored.append(text)

    async def expect_error(self, frame: dict[str, Any] | str, code: str, ref: str | None = None) -> None:
        await self.raw.send(frame)
        reply = await self.raw.recv(10)
        assert reply["type"] == "error", f"{frame!r:.200} -> {reply}"
        assert reply["code"] == code, f"{frame!r:.200} -> {reply}"
        assert isinstance(reply["message"], str) and reply["message"]
        if ref is not None:
            assert reply.get("ref", "") == ref
        # Nothing else came for it (no ack, no second error).
        assert await self.raw.roundtrip() == []

    async def check_unchanged(self) -> None:
        """The server is healthy, the next send gets the next seq, history holds nothing extra."""
        assert healthz(self.srv)["status"] == "ok"
        await self.send_ok()
        await self.raw.send({"type": "history", "conv": CONV, "limit": 200, "ref": "h"})
        page = await self.raw.recv(10)
        assert page["type"] == "history_page", page
        assert page["last_seq"] == len(self.stored)
        got = [(m["seq"], unb64(m["body"]).decode(), m["sender"]) for m in page["messages"]]
        assert got == [(i + 1, text, "alice") for i, text in enumerate(self.stored)]


@pytest.fixture
async def world(server: ServerProcess):
    tokens = add_users(server, ["alice", "bob", "carol"])
    bob = await RawWS.open(server, tokens["bob"])
    # bob and carol have a conversation alice is not in.
    await bob.send({"type": "send", "id": "bc-1", "to": "carol", "body": b64("private")})
    ack = await bob.recv_type("ack")
    assert ack["conv"] == OTHER
    await bob.close()
    raw = await RawWS.open(server, tokens["alice"])
    alice = Alice(server, raw)
    await alice.send_ok()
    try:
        yield alice, tokens
    finally:
        await raw.close()
        if alice.raw is not raw:
            await alice.raw.close()


MALFORMED: list[tuple[str, Any, str, str | None]] = [
    ("not json", "{this is not json", "bad_frame", ""),
    ("truncated json", '{"type": "send", "id": "t1"', "bad_frame", ""),
    ("empty", "", "bad_frame", ""),
    ("json array", "[1, 2, 3]", "bad_frame", ""),
    ("json string", '"hello"', "bad_frame", ""),
    ("json null", "null", "bad_frame", ""),
    ("no type", {"id": "nt", "to": "bob", "body": b64("x")}, "bad_frame", "nt"),
    ("unknown type", {"type": "teleport", "to": "bob"}, "unknown_type", None),
    ("unknown type with ref", {"type": "nope", "ref": "r9"}, "unknown_type", "r9"),
    ("type not a string", {"type": 7}, "bad_frame", None),
    ("id not a string", {"type": "send", "id": 5, "to": "bob", "body": b64("x")}, "bad_frame", ""),
    ("body not base64", {"type": "send", "id": "b64", "to": "bob", "body": "***"}, "bad_frame", "b64"),
    ("body a number", {"type": "send", "id": "bn", "to": "bob", "body": 12}, "bad_frame", "bn"),
    ("bad user name", {"type": "send", "id": "un", "to": "Bob!", "body": b64("x")}, "bad_frame", "un"),
    ("empty id", {"type": "send", "id": "", "to": "bob", "body": b64("x")}, "bad_frame", None),
    ("id too long", {"type": "send", "id": "i" * 65, "to": "bob", "body": b64("x")}, "bad_frame", None),
    ("seq a string", {"type": "dack", "conv": CONV, "seq": "1"}, "bad_frame", None),
    ("seq negative", {"type": "dack", "conv": CONV, "seq": -1}, "bad_frame", None),
    ("seq a float", {"type": "read", "conv": CONV, "seq": 1.5}, "bad_frame", None),
    ("history limit 0", {"type": "history", "conv": CONV, "limit": 0, "ref": "l0"}, "bad_frame", "l0"),
    ("history limit 201", {"type": "history", "conv": CONV, "limit": 201, "ref": "l2"}, "bad_frame", "l2"),
    ("members not a list", {"type": "group_create", "name": "g", "members": "bob"}, "bad_frame", None),
    ("typing active not bool", {"type": "typing", "conv": CONV, "active": "yes"}, "bad_frame", None),
    (
        "presence too many",
        {"type": "presence_sub", "users": [f"u{i}" for i in range(257)]},
        "bad_frame",
        None,
    ),
    # '$' in a pattern also matches before a trailing newline: names must match in full.
    (
        "name with trailing newline",
        {"type": "send", "id": "nl", "to": "bob\n", "body": b64("x")},
        "bad_frame",
        "nl",
    ),
    ("presence name with newline", {"type": "presence_sub", "users": ["bob\n"]}, "bad_frame", None),
    (
        "group member with newline",
        {"type": "group_create", "name": "g", "members": ["bob\n"]},
        "bad_frame",
        None,
    ),
    ("deeply nested array", "[" * 5000 + "]" * 5000, "bad_frame", ""),
    ("deeply nested field", '{"type": "ping", "t": ' + "[" * 5000 + "]" * 5000 + "}", "bad_frame", None),
]

MISSING: list[tuple[str, Any, str, str | None]] = [
    ("send without body", {"type": "send", "id": "nb", "to": "bob"}, "bad_frame", "nb"),
    ("send without id", {"type": "send", "to": "bob", "body": b64("x")}, "bad_frame", ""),
    ("send without target", {"type": "send", "id": "nt2", "body": b64("x")}, "bad_frame", "nt2"),
    (
        "send with both targets",
        {"type": "send", "id": "bt", "to": "bob", "conv": CONV, "body": b64("x")},
        "bad_frame",
        "bt",
    ),
    ("dack without seq", {"type": "dack", "conv": CONV}, "bad_frame", None),
    ("read without conv", {"type": "read", "seq": 1}, "bad_frame", None),
    ("rack without rv", {"type": "rack", "conv": CONV}, "bad_frame", None),
    ("history without conv", {"type": "history", "ref": "hc"}, "bad_frame", "hc"),
    (
        "history before and after",
        {"type": "history", "conv": CONV, "before": 5, "after": 1, "ref": "ba"},
        "bad_frame",
        "ba",
    ),
    ("group_create without name", {"type": "group_create", "members": [], "ref": "gn"}, "bad_frame", "gn"),
    ("group_add without group", {"type": "group_add", "members": ["bob"], "ref": "ga"}, "bad_frame", "ga"),
    ("typing without conv", {"type": "typing"}, "bad_frame", None),
    ("auth again", {"type": "auth", "token": "whatever"}, "invalid", None),
]


@pytest.mark.parametrize("cases", [MALFORMED, MISSING], ids=["malformed", "missing-fields"])
async def test_malformed_frames_get_typed_errors(world, cases) -> None:
    alice, _ = world
    for _name, frame, code, ref in cases:
        await alice.expect_error(frame, code, ref)
    await alice.check_unchanged()


async def test_oversized_body_is_too_large(world) -> None:
    alice, _ = world
    body = b64(b"z" * (72 * 1024 + 1))  # 64 KiB of plaintext + 8 KiB of encryption is the limit
    await alice.expect_error({"type": "send", "id": "big", "to": "bob", "body": body}, "too_large", "big")
    await alice.check_unchanged()


async def test_oversized_frame_is_too_large_and_socket_stays(world) -> None:
    alice, _ = world
    # 200 KiB of frame, body within limits but padded with an unknown field.
    frame = {"type": "send", "id": "pad", "to": "bob", "body": b64("x"), "pad": "p" * (200 * 1024)}
    await alice.expect_error(frame, "too_large")
    # A frame over the limit that is not even JSON.
    await alice.expect_error("x" * (129 * 1024), "too_large")
    # The limit is in bytes: 50,000 three-byte characters are ~146 KiB.
    await alice.expect_error(
        json.dumps({"type": "ping", "t": 5, "pad": "€" * 50_000}, ensure_ascii=False), "too_large"
    )
    await alice.check_unchanged()
    assert not alice.raw.ws.closed


async def test_frame_over_hard_limit_closes_with_1009(world, server: ServerProcess) -> None:
    alice, tokens = world
    try:
        await alice.raw.send("y" * (1024 * 1024 + 10))
        with pytest.raises(Closed) as info:
            await alice.raw.recv_until(lambda fr: False, 10)
        assert info.value.code == 1009
    finally:
        await alice.raw.close()
    # The server is fine and nothing was stored.
    alice.raw = await RawWS.open(server, tokens["alice"])
    await alice.check_unchanged()


async def _open_unauthenticated(srv: ServerProcess) -> RawWS:
    return await RawWS.open(srv)


async def test_first_frame_not_auth(server: ServerProcess) -> None:
    tokens = add_users(server, ["alice", "bob"])
    raw = await _open_unauthenticated(server)
    try:
        await raw.send({"type": "send", "id": "pre", "to": "bob", "body": b64("sneaky")})
        err = await raw.recv(5)
        assert (err["type"], err["code"]) == ("error", "auth_required")
        assert await raw.wait_closed(5) == 4001
    finally:
        await raw.close()
    # Nothing was stored.
    raw = await RawWS.open(server, tokens["bob"])
    try:
        await raw.send({"type": "history", "conv": CONV, "ref": "h"})
        page = await raw.recv(5)
        # A 1:1 chat nobody wrote in is an empty page for its two members.
        assert (page["type"], page.get("messages"), page.get("last_seq")) == ("history_page", [], 0), page
        assert await raw.drain(0.5) == [], "a message sent before auth was delivered"
        # The conversation starts at seq 1 now: nothing was stored before.
        await raw.send({"type": "send", "id": "first", "to": "alice", "body": b64("hi")})
        ack = await raw.recv_type("ack")
        assert (ack["conv"], ack["seq"]) == (CONV, 1)
    finally:
        await raw.close()


@pytest.mark.parametrize(
    "auth",
    [
        {"type": "auth", "token": "not-a-real-token"},
        {"type": "auth", "token": "test-token-alice-0123456789x"},
    ],
    ids=["garbage", "near-miss"],
)
async def test_bad_token(server: ServerProcess, auth: dict[str, Any]) -> None:
    add_users(server, ["alice"])
    raw = await _open_unauthenticated(server)
    try:
        await raw.send(auth)
        err = await raw.recv(5)
        assert (err["type"], err["code"]) == ("error", "auth_failed")
        assert await raw.wait_closed(5) == 4001
    finally:
        await raw.close()
    assert healthz(server)["status"] == "ok"


async def test_malformed_auth_frame_closes(server: ServerProcess) -> None:
    for frame in ("{nope", {"type": "auth"}, {"type": "auth", "token": ""}):
        raw = await _open_unauthenticated(server)
        try:
            await raw.send(frame)
            err = await raw.recv(5)
            assert err["type"] == "error" and err["code"] == "bad_frame", err
            assert await raw.wait_closed(5) == 4001
        finally:
            await raw.close()


async def test_auth_timeout(make_server) -> None:
    srv = make_server("--auth-timeout", "0.5")
    raw = await _open_unauthenticated(srv)
    try:
        start = time.monotonic()
        err = await raw.recv(5)
        assert (err["type"], err["code"]) == ("error", "auth_timeout")
        assert await raw.wait_closed(5) == 4002
        assert time.monotonic() - start < 3.0
    finally:
        await raw.close()
    assert healthz(srv)["connections"] == 0


async def test_unsupported_version(server: ServerProcess) -> None:
    tokens = add_users(server, ["alice"])
    for version in (2, 0, 999):
        raw = await _open_unauthenticated(server)
        try:
            await raw.send({"type": "auth", "token": tokens["alice"], "v": version})
            err = await raw.recv(5)
            assert (err["type"], err["code"]) == ("error", "unsupported_version")
            assert await raw.wait_closed(5) == 4005
        finally:
            await raw.close()
    # v1 explicitly is fine.
    raw = await RawWS.open(server, tokens["alice"], v=1)
    await raw.close()


async def test_forged_sender_is_ignored(world, server: ServerProcess) -> None:
    alice, tokens = world
    await alice.raw.send(
        {"type": "send", "id": "forged", "to": "bob", "body": b64("from whom?"), "sender": "carol"}
    )
    ack = await alice.raw.recv_type("ack")
    assert ack["conv"] == CONV
    alice.stored.append("from whom?")
    bob = await RawWS.open(server, tokens["bob"])
    try:
        frames = await bob.drain(1.0)
        msgs = [fr for fr in frames if fr["type"] == "msg"]
        forged = [m for m in msgs if m["id"] == "forged"]
        assert len(forged) == 1
        assert forged[0]["sender"] == "alice" and forged[0]["conv"] == CONV
    finally:
        await bob.close()
    # carol got nothing and has no conversation with bob carrying it.
    carol = await RawWS.open(server, tokens["carol"])
    try:
        await carol.send({"type": "history", "conv": OTHER, "ref": "h"})
        page = await carol.recv_type("history_page")
        assert [m["id"] for m in page["messages"]] == ["bc-1"]
    finally:
        await carol.close()
    await alice.check_unchanged()


async def test_refused_requests(world) -> None:
    alice, _ = world
    ghost_group = "g:0123456789abcdef"
    cases: list[tuple[dict[str, Any], str, str | None]] = [
        # Sending into a conversation alice is not in (or posing as a member).
        ({"type": "send", "id": "nm", "conv": OTHER, "body": b64("x")}, "not_member", "nm"),
        ({"type": "send", "id": "ug", "conv": ghost_group, "body": b64("x")}, "unknown_conversation", "ug"),
        ({"type": "send", "id": "self", "to": "alice", "body": b64("x")}, "invalid", "self"),
        ({"type": "send", "id": "nou", "to": "nobody", "body": b64("x")}, "unknown_user", "nou"),
        # Acks and markers in someone else's conversation.
        ({"type": "dack", "conv": OTHER, "seq": 1}, "not_member", None),
        ({"type": "read", "conv": OTHER, "seq": 1}, "not_member", None),
        ({"type": "rack", "conv": OTHER, "rv": 1}, "not_member", None),
        # Past the end.
        ({"type": "dack", "conv": CONV, "seq": 10_000}, "invalid", None),
        ({"type": "read", "conv": CONV, "seq": 10_000}, "invalid", None),
        # Unknown conversations.
        ({"type": "read", "conv": "d:alice:zed", "seq": 1}, "unknown_conversation", None),
        ({"type": "dack", "conv": ghost_group, "seq": 1}, "unknown_conversation", None),
        ({"type": "rack", "conv": ghost_group, "rv": 1}, "unknown_conversation", None),
        ({"type": "rack", "conv": "d:alice:zed", "rv": 1}, "unknown_conversation", None),
        ({"type": "history", "conv": OTHER, "ref": "ho"}, "not_member", "ho"),
        ({"type": "history", "conv": ghost_group, "ref": "hg"}, "unknown_conversation", "hg"),
        ({"type": "typing", "conv": OTHER}, "not_member", None),
        # Groups that do not exist / are not groups.
        ({"type": "group_info", "group": ghost_group, "ref": "gi"}, "unknown_conversation", "gi"),
        ({"type": "group_info", "group": CONV, "ref": "gd"}, "unknown_conversation", "gd"),
        (
            {"type": "group_add", "group": ghost_group, "members": ["bob"], "ref": "gx"},
            "unknown_conversation",
            "gx",
        ),
        ({"type": "group_leave", "group": ghost_group, "ref": "gl"}, "unknown_conversation", "gl"),
        ({"type": "group_create", "name": "g", "members": ["nobody"], "ref": "gc"}, "unknown_user", "gc"),
    ]
    for frame, code, ref in cases:
        await alice.expect_error(frame, code, ref)
    await alice.check_unchanged()
    # bob's conversation with carol is untouched by alice's attempts.
    await alice.raw.send({"type": "ping", "t": 1})
    assert (await alice.raw.recv())["type"] == "pong"


async def test_refusals_do_not_move_marks(world, server: ServerProcess) -> None:
    """A refused dack/read must not change receipts: bob gets no phantom ✓✓."""
    alice, tokens = world
    bob = await RawWS.open(server, tokens["bob"])
    try:
        # bob's own view of OTHER: carol has not acked anything.
        await alice.expect_error({"type": "dack", "conv": OTHER, "seq": 1}, "not_member")
        await alice.expect_error({"type": "read", "conv": OTHER, "seq": 1}, "not_member")
        frames = await bob.drain(0.8)
        assert [fr for fr in frames if fr["type"] == "receipt" and fr["conv"] == OTHER] == []
    finally:
        await bob.close()
    carol = await RawWS.open(server, tokens["carol"])
    try:
        frames = await carol.drain(0.8)
        msgs = [fr for fr in frames if fr["type"] == "msg"]
        assert [m["id"] for m in msgs] == ["bc-1"], "carol's inbox changed"
    finally:
        await carol.close()


async def test_binary_frames_are_refused(world) -> None:
    """Text frames only: even valid JSON in a binary frame gets ``bad_frame``
    and does nothing (a send in one stores nothing); the socket stays."""
    alice, _ = world
    await alice.raw.ws.send_bytes(json.dumps({"type": "ping", "t": 77}).encode())
    err = await alice.raw.recv(5)
    assert (err["type"], err["code"]) == ("error", "bad_frame"), err
    assert "binary" in err["message"]
    assert await alice.raw.roundtrip() == []
    send = {"type": "send", "id": "bin", "to": "bob", "body": b64("in binary")}
    await alice.raw.ws.send_bytes(json.dumps(send).encode())
    err = await alice.raw.recv(5)
    assert (err["type"], err["code"]) == ("error", "bad_frame"), err
    assert await alice.raw.roundtrip() == []
    await alice.raw.ws.send_bytes(b"\xff\xfe not json")
    err = await alice.raw.recv(5)
    assert (err["type"], err["code"]) == ("error", "bad_frame")
    await alice.check_unchanged()


async def test_binary_auth_frame_closes(server: ServerProcess) -> None:
    tokens = add_users(server, ["alice"])
    raw = await _open_unauthenticated(server)
    try:
        await raw.ws.send_bytes(json.dumps({"type": "auth", "token": tokens["alice"]}).encode())
        err = await raw.recv(5)
        assert (err["type"], err["code"]) == ("error", "bad_frame"), err
        assert await raw.wait_closed(5) == 4001
    finally:
        await raw.close()


async def test_many_bad_frames_then_clean_close(world, server: ServerProcess) -> None:
    alice, _ = world
    for i in range(200):
        await alice.raw.send("{" * (i % 7 + 1))
    for _ in range(200):
        err = await alice.raw.recv(10)
        assert err["code"] == "bad_frame"
    await alice.check_unchanged()
    async with aiohttp.ClientSession() as http, http.get(server.url + "/healthz") as resp:
        assert resp.status == 200
    await asyncio.sleep(0)


async def test_invalid_dack_does_not_cancel_an_earlier_valid_one(server: ServerProcess) -> None:
    """A valid cumulative ack followed (in the same burst) by one past the end:
    the valid one still counts and only the bad one is refused.

    Regression target: the store collapses acks of one (user, conv) queued in
    one commit batch into the last of them; when that last one is invalid, the
    valid acks merged into it must not be rejected (or lost) with it."""
    tokens = add_users(server, ["alice", "bob"])
    alice = await RawWS.open(server, tokens["alice"])
    bob = await RawWS.open(server, tokens["bob"])
    try:
        for i in range(1, 4):
            await alice.send({"type": "send", "id": f"a{i}", "to": "bob", "body": b64(f"a{i}")})
            assert (await alice.recv_type("ack"))["seq"] == i
        msgs = [fr for fr in await bob.drain(0.5) if fr["type"] == "msg"]
        assert [m["seq"] for m in msgs] == [1, 2, 3]
        # Keep the store's writer busy so the two acks queue up in one batch.
        burst = "".join(
            json.dumps({"type": "send", "id": f"b{i}", "to": "alice", "body": b64("x" * 2000)}) + "\n"
            for i in range(200)
        ).splitlines()
        for frame in burst:
            await bob.send(frame)
        await bob.send({"type": "dack", "conv": CONV, "seq": 3})
        await bob.send({"type": "dack", "conv": CONV, "seq": 9999})
        frames = await bob.roundtrip(15)
        frames += await bob.drain(1.0)
        errors = [fr for fr in frames if fr["type"] == "error"]
        assert [e["code"] for e in errors] == ["invalid"], f"the valid dack was refused too: {errors}"
        # alice hears that bob has everything up to 3 (✓✓).
        receipt, _ = await alice.recv_until(
            lambda fr: fr["type"] == "receipt" and fr["marks"].get("bob", [0, 0])[0] >= 3, 10
        )
        assert receipt["all_delivered"] >= 3
    finally:
        await close_all_raw(alice, bob)
    # The delivered mark is durable: a new connection of bob is not sent 1..3 again.
    bob = await RawWS.open(server, tokens["bob"])
    try:
        again = [fr for fr in await bob.drain(1.0) if fr["type"] == "msg"]
        assert again == [], f"acked messages delivered again: {[m['seq'] for m in again]}"
    finally:
        await bob.close()


async def close_all_raw(*raws: RawWS) -> None:
    for raw in raws:
        await raw.close()


async def test_a_message_that_is_not_end_to_end_encrypted_is_refused(world) -> None:
    """No plaintext path in the server: a send whose content type is not the
    end-to-end envelope is refused, named by its id, and stores nothing."""
    alice, _ = world
    for ct in ("text/plain", "application/json", "application/vnd.roost.membership+json"):
        frame = {"type": "send", "id": f"plain-{ct}", "to": "bob", "ct": ct, "body": b64("secret words")}
        await alice.expect_error(frame, "encryption_required", ref=f"plain-{ct}")
    await alice.check_unchanged()
