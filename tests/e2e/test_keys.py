"""The key directory end to end, embedded and cluster (two gateways: the
users of one test connect to different ones): keys_put / keys_count /
keys_get / keys_low over real sockets to real servers.

Keys are made with ``xeddsa`` and ``cryptography`` (tests/keys_material.py)."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import sqlite3
from typing import Any

import pytest

from roost.core.prekeys import verify_signature
from roost.store.sqlite import database_path
from tests.cli_subprocess import run_roost
from tests.e2e.cluster import ClusterServer, run_sync
from tests.e2e.helpers import RawWS, add_users, close_all
from tests.keys_material import Identity, b64, ec_public, kem_public, upload


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


async def put(ws: RawWS, frame: dict[str, Any]) -> dict[str, Any]:
    await ws.send(frame)
    answer, _ = await ws.recv_until(
        lambda fr: fr.get("ref") == frame.get("ref", "") and fr["type"] != "keys_low"
    )
    return answer


async def counts(ws: RawWS) -> dict[str, Any]:
    await ws.send({"type": "keys_count", "ref": "count"})
    answer, _ = await ws.recv_until(lambda fr: fr.get("ref") == "count")
    return answer


async def fetch(ws: RawWS, user: str, ref: str = "get") -> dict[str, Any]:
    await ws.send({"type": "keys_get", "user": user, "ref": ref})
    answer, _ = await ws.recv_until(lambda fr: fr.get("ref") == ref)
    return answer


def state(ec: int, kem: int, ref: str = "put") -> dict[str, Any]:
    return {"type": "keys_state", "ec": ec, "kem": kem, "has_identity": True, "ref": ref}


async def test_a_bundle_hands_out_each_one_time_key_once_then_the_signed_and_last_resort_keys(
    server: Any,
) -> None:
    tokens = add_users(server, ["alice", "bob"])
    alice = await RawWS.open(server, tokens["alice"])
    bob = await RawWS.open(server, tokens["bob"])
    try:
        ident = Identity.generate()
        frame = upload(ident, ec_ids=[7, 3, 5], kem_ids=[9, 4], last_resort=1000)
        assert await put(alice, frame) == state(3, 2)
        bundles = [await fetch(bob, "alice", f"get{i}") for i in range(5)]
        for b in bundles:
            assert (b["type"], b["user"], unb64(b["identity"])) == ("keys_bundle", "alice", ident.public)
            (dev,) = b["devices"]
            assert (dev["device"], dev["registration"]) == (1, 42)
            signed = dev["signed"]
            assert unb64(signed["key"]) == unb64(frame["signed"]["key"])
            assert verify_signature(ident.public, unb64(signed["key"]), unb64(signed["sig"]))
            assert verify_signature(ident.public, unb64(dev["kem"]["key"]), unb64(dev["kem"]["sig"]))
        handed = [b["devices"][0] for b in bundles]
        # Lowest id first, each one-time key once, then none (EC) / the last-resort key (KEM).
        assert [d["prekey"] and d["prekey"]["id"] for d in handed] == [3, 5, 7, None, None]
        by_id = {p["id"]: p["key"] for p in frame["prekeys"]}
        assert all(d["prekey"]["key"] == by_id[d["prekey"]["id"]] for d in handed[:3])
        assert [(d["kem"]["id"], d["kem_last_resort"]) for d in handed] == [
            (4, False),
            (9, False),
            (1000, True),
            (1000, True),
            (1000, True),
        ]
        assert await counts(alice) == {**state(0, 0), "ref": "count"}
    finally:
        await close_all(alice, bob)


async def test_a_keys_put_of_a_hundred_kem_keys_is_over_the_common_frame_limit_and_accepted(
    server: Any,
) -> None:
    tokens = add_users(server, ["alice"])
    alice = await RawWS.open(server, tokens["alice"])
    try:
        frame = upload(Identity.generate(), ec_ids=range(1, 101), kem_ids=range(1, 101))
        assert len(json.dumps(frame)) > 128 * 1024
        assert await put(alice, frame) == state(100, 100)
    finally:
        await close_all(alice)


def _bad_uploads(ident: Identity, other: Identity) -> list[tuple[str, str, dict[str, Any]]]:
    """(what, expected code, frame): every way a keys_put is refused."""
    good = upload(ident, ec_ids=[50, 51], kem_ids=[50, 51], last_resort=2000, signed_id=2)
    cases: list[tuple[str, str, dict[str, Any]]] = []

    def case(what: str, code: str, change: Any) -> None:
        frame = copy.deepcopy(good)
        change(frame)
        frame["ref"] = what
        cases.append((what, code, frame))

    def set_in(path: list[Any], value: Any) -> Any:
        def change(frame: dict[str, Any]) -> None:
            target = frame
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value

        return change

    short_ec = b64(ec_public()[:32])
    case("identity-short", "bad_key", set_in(["identity"], b64(ident.public[:32])))
    case("identity-type", "bad_key", set_in(["identity"], b64(b"\x06" + ident.public[1:])))
    case("signed-short", "bad_key", set_in(["signed", "key"], short_ec))
    case("prekey-short", "bad_key", set_in(["prekeys", 1, "key"], short_ec))
    case("prekey-long", "bad_key", set_in(["prekeys", 0, "key"], b64(ec_public() + b"x")))
    case("prekey-type", "bad_key", set_in(["prekeys", 0, "key"], b64(b"\x08" + ec_public()[1:])))
    case("prekey-id-0", "bad_key", set_in(["prekeys", 0, "id"], 0))
    case("prekey-id-big", "bad_key", set_in(["prekeys", 0, "id"], 2**24))
    case("prekey-base64", "bad_key", set_in(["prekeys", 0, "key"], "not base64!"))
    case("kem-short", "bad_key", set_in(["kem_prekeys", 0, "key"], b64(kem_public()[:1568])))
    bad_kem = b"\x05" + kem_public()[1:]
    case(
        "kem-type",
        "bad_key",
        set_in(["kem_prekeys", 0], {"id": 50, "key": b64(bad_kem), "sig": b64(ident.sign(bad_kem))}),
    )
    case(
        "signed-sig-flipped",
        "bad_signature",
        lambda fr: fr["signed"].update(sig=b64(flip(fr["signed"]["sig"]))),
    )
    case("signed-sig-short", "bad_signature", set_in(["signed", "sig"], b64(b"\x00" * 63)))
    # Signed by another identity than the frame's: a forgery.
    forged = upload(ident, ec_ids=[], kem_ids=[50], last_resort=2000, signer=other)
    case("signed-forged", "bad_signature", set_in(["signed"], forged["signed"]))
    case("kem-forged", "bad_signature", set_in(["kem_prekeys", 0], forged["kem_prekeys"][0]))
    case("last-resort-forged", "bad_signature", set_in(["last_resort"], forged["last_resort"]))
    case(
        "kem-sig-of-other-key",
        "bad_signature",
        set_in(["kem_prekeys", 0, "sig"], good["kem_prekeys"][1]["sig"]),
    )
    case(
        "too-many-in-frame",
        "too_many_keys",
        set_in(["prekeys"], [{"id": i, "key": b64(ec_public())} for i in range(1, 102)]),
    )
    case("prekey-id-twice", "duplicate_key_id", set_in(["prekeys", 1, "id"], 50))
    case("kem-id-twice", "duplicate_key_id", set_in(["kem_prekeys", 1, "id"], 50))
    case("kem-id-is-last-resort", "duplicate_key_id", set_in(["kem_prekeys", 1, "id"], 2000))
    case("prekey-id-stored", "duplicate_key_id", set_in(["prekeys", 1, "id"], 3))
    case("kem-id-stored", "duplicate_key_id", set_in(["kem_prekeys", 1, "id"], 4))
    return cases


def flip(sig_b64: str) -> bytes:
    sig = bytearray(unb64(sig_b64))
    sig[10] ^= 1
    return bytes(sig)


async def test_every_bad_upload_is_refused_with_its_code_and_changes_nothing(server: Any) -> None:
    tokens = add_users(server, ["alice", "bob"])
    alice = await RawWS.open(server, tokens["alice"])
    bob = await RawWS.open(server, tokens["bob"])
    try:
        ident, other = Identity.generate(), Identity.generate()
        first = upload(ident, ec_ids=[3, 4], kem_ids=[4, 5], last_resort=1000)
        assert await put(alice, first) == state(2, 2)
        for what, code, frame in _bad_uploads(ident, other):
            answer = await put(alice, frame)
            assert (answer["type"], answer["code"], answer["ref"]) == ("error", code, what), answer
        # A first upload of a new identity without a last-resort key.
        no_last = upload(Identity.generate(), last_resort=None)
        answer = await put(alice, no_last)
        assert (answer["type"], answer["code"]) == ("error", "invalid")
        # Nothing changed: the same stock, identity, signed and last-resort keys.
        assert await counts(alice) == {**state(2, 2), "ref": "count"}
        bundles = [(await fetch(bob, "alice", f"g{i}")) for i in range(3)]
        assert all(unb64(b["identity"]) == ident.public for b in bundles)
        devs = [b["devices"][0] for b in bundles]
        assert all(d["signed"]["key"] == first["signed"]["key"] for d in devs)
        assert [d["prekey"] and d["prekey"]["id"] for d in devs] == [3, 4, None]
        assert [d["kem"]["id"] for d in devs] == [4, 5, 1000]
        assert devs[2]["kem"]["key"] == first["last_resort"]["key"]
    finally:
        await close_all(alice, bob)


async def test_the_stock_is_capped_at_a_thousand_per_kind(server: Any) -> None:
    tokens = add_users(server, ["alice"])
    alice = await RawWS.open(server, tokens["alice"])
    try:
        ident = Identity.generate()
        for n in range(10):
            ids = range(n * 100 + 1, n * 100 + 101)
            assert await put(alice, upload(ident, ec_ids=ids, kem_ids=[])) == state((n + 1) * 100, 0)
        answer = await put(alice, upload(ident, ec_ids=[5000], kem_ids=[5000]))
        assert (answer["type"], answer["code"]) == ("error", "too_many_keys")
        assert await counts(alice) == {**state(1000, 0), "ref": "count"}  # the KEM key was not added either
    finally:
        await close_all(alice)


async def test_a_new_identity_replaces_every_key_of_the_device(server: Any) -> None:
    tokens = add_users(server, ["alice", "bob"])
    alice = await RawWS.open(server, tokens["alice"])
    bob = await RawWS.open(server, tokens["bob"])
    try:
        old, new = Identity.generate(), Identity.generate()
        assert await put(alice, upload(old, ec_ids=range(1, 6), kem_ids=range(1, 6))) == state(5, 5)
        # Reinstalled: the same ids again are no duplicates, the old keys are gone.
        fresh = upload(new, ec_ids=[2, 3], kem_ids=[2], last_resort=77, registration=9)
        assert await put(alice, fresh) == state(2, 1)
        b = await fetch(bob, "alice")
        assert unb64(b["identity"]) == new.public
        dev = b["devices"][0]
        assert dev["registration"] == 9
        assert dev["prekey"] == fresh["prekeys"][0]
        assert verify_signature(new.public, unb64(dev["kem"]["key"]), unb64(dev["kem"]["sig"]))
        assert verify_signature(new.public, unb64(dev["signed"]["key"]), unb64(dev["signed"]["sig"]))
        # Refill without a last-resort key keeps the stored one.
        assert await put(alice, upload(new, ec_ids=[10], kem_ids=[], last_resort=None)) == state(2, 0)
        dev = (await fetch(bob, "alice", "g2"))["devices"][0]
        assert (dev["kem"]["id"], dev["kem_last_resort"]) == (77, True)
    finally:
        await close_all(alice, bob)


async def test_keys_are_stored_under_the_uploader_only(server: Any) -> None:
    """keys_put has no user field: whatever a frame claims, the keys are the
    authenticated uploader's and are fetched under its name only."""
    tokens = add_users(server, ["alice", "bob", "carol"])
    mallory = await RawWS.open(server, tokens["carol"])
    bob = await RawWS.open(server, tokens["bob"])
    try:
        ident = Identity.generate()
        frame = {**upload(ident), "user": "alice"}  # an unknown field is ignored
        assert await put(mallory, frame) == state(5, 5)
        assert (await fetch(bob, "alice"))["code"] == "no_keys"
        b = await fetch(bob, "carol", "g2")
        assert (b["user"], unb64(b["identity"])) == ("carol", ident.public)
        assert (await fetch(bob, "nobody", "g3"))["code"] == "unknown_user"
        assert (await fetch(bob, "NOT A NAME", "g4"))["code"] == "bad_frame"
    finally:
        await close_all(mallory, bob)


async def test_bundle_fetches_are_rate_limited_per_requester(server: Any) -> None:
    tokens = add_users(server, ["alice", "bob", "carol"])
    alice = await RawWS.open(server, tokens["alice"])
    bob = await RawWS.open(server, tokens["bob"])
    carol = await RawWS.open(server, tokens["carol"])
    try:
        assert await put(alice, upload(Identity.generate(), ec_ids=range(1, 51), kem_ids=[])) == state(50, 0)
        for i in range(10):  # the burst of one requester for one target
            await bob.send({"type": "keys_get", "user": "alice", "ref": f"b{i}"})
        await bob.send({"type": "keys_get", "user": "alice", "ref": "over"})
        answers = {}
        while len(answers) < 11:
            fr = await bob.recv()
            if fr.get("ref"):
                answers[fr["ref"]] = fr
        assert all(answers[f"b{i}"]["type"] == "keys_bundle" for i in range(10))
        assert (answers["over"]["type"], answers["over"]["code"]) == ("error", "rate_limited")
        # The refused fetch handed nothing out; another requester is not limited,
        # nor is the same requester for another target (carol has no keys: no_keys, not rate_limited).
        assert (await counts(alice))["ec"] == 40
        dev = (await fetch(carol, "alice"))["devices"][0]
        assert dev["prekey"]["id"] == 11
        assert (await fetch(bob, "carol", "other"))["code"] == "no_keys"
    finally:
        await close_all(alice, bob, carol)


async def test_the_owner_is_told_when_a_fetch_leaves_its_stock_low(server: Any) -> None:
    """In cluster mode alice and bob are on different gateways: the push is routed."""
    tokens = add_users(server, ["alice", "bob"])
    alice = await RawWS.open(server, tokens["alice"])
    bob = await RawWS.open(server, tokens["bob"])
    try:
        assert await put(
            alice, upload(Identity.generate(), ec_ids=range(1, 12), kem_ids=range(1, 13))
        ) == state(11, 12)
        await fetch(bob, "alice", "g1")  # 10 and 11 left: not low
        assert [fr for fr in await alice.roundtrip() if fr["type"] == "keys_low"] == []
        await fetch(bob, "alice", "g2")  # 9 EC left
        low = await alice.recv_type("keys_low")
        assert low == {"type": "keys_low", "device": 1, "ec": 9, "kem": 10}
    finally:
        await close_all(alice, bob)


async def test_after_welcome_a_device_with_few_or_no_keys_is_told(server: Any) -> None:
    tokens = add_users(server, ["alice", "bob", "carol"])
    plain = await RawWS.open(server, tokens["bob"])  # no e2ee: never hears of keys
    fresh = await RawWS.open(server, tokens["carol"], e2ee=True)
    alice = await RawWS.open(server, tokens["alice"], e2ee=True)
    again: RawWS | None = None
    try:
        assert await fresh.recv_type("keys_low") == {"type": "keys_low", "device": 1, "ec": 0, "kem": 0}
        assert await alice.recv_type("keys_low") == {"type": "keys_low", "device": 1, "ec": 0, "kem": 0}
        assert [fr for fr in await plain.roundtrip() if fr["type"] == "keys_low"] == []
        assert await put(
            alice, upload(Identity.generate(), ec_ids=range(1, 20), kem_ids=range(1, 4))
        ) == state(19, 3)
        await alice.close()
        again = await RawWS.open(server, tokens["alice"])  # published keys: told even without e2ee
        assert await again.recv_type("keys_low") == {"type": "keys_low", "device": 1, "ec": 19, "kem": 3}
        await put(again, upload(Identity.generate(), ec_ids=range(1, 20), kem_ids=range(1, 20)))
        await again.close()
        again = await RawWS.open(server, tokens["alice"], e2ee=True)  # enough keys: nothing
        assert [fr for fr in await again.roundtrip() if fr["type"] == "keys_low"] == []
    finally:
        await close_all(plain, fresh, alice, again)


@pytest.mark.parametrize("standard", [True, False], ids=["xeddsa", "libsignal-sign-bit"])
async def test_both_xeddsa_signature_forms_are_accepted(server: Any, standard: bool) -> None:
    tokens = add_users(server, ["alice"])
    alice = await RawWS.open(server, tokens["alice"])
    try:
        ident = Identity.generate()
        frame = upload(ident, ec_ids=[], kem_ids=[1])
        sign = ident.sign_standard if standard else ident.sign
        for part in (frame["signed"], frame["kem_prekeys"][0], frame["last_resort"]):
            part["sig"] = b64(sign(unb64(part["key"])))
        assert await put(alice, frame) == state(0, 1)
    finally:
        await close_all(alice)


async def _key_rows(server: Any, user: str) -> int:
    """Rows of ``user`` in the key tables, read straight from the store."""
    tables = ("key_devices", "key_prekeys", "key_kem_prekeys")
    if isinstance(server, ClusterServer):
        import asyncpg

        async def count() -> int:
            conn = await asyncpg.connect(server.dsn)
            try:
                return sum(
                    [
                        await conn.fetchval(f"SELECT count(*) FROM {t} WHERE user_name = $1", user)
                        for t in tables
                    ]
                )
            finally:
                await conn.close()

        return run_sync(count)
    conn = sqlite3.connect(database_path(server.data_dir))
    try:
        return sum(
            conn.execute(f"SELECT count(*) FROM {t} WHERE user = ?", (user,)).fetchone()[0] for t in tables
        )
    finally:
        conn.close()


async def test_removing_an_account_deletes_its_keys(server: Any) -> None:
    tokens = add_users(server, ["alice", "bob"])
    alice = await RawWS.open(server, tokens["alice"])
    bob = await RawWS.open(server, tokens["bob"])
    try:
        await put(alice, upload(Identity.generate()))
        await put(bob, upload(Identity.generate()))
        assert await _key_rows(server, "alice") == 11  # the device row, 5 + 5 one-time keys
        out = await asyncio.to_thread(run_roost, "user", "remove", "alice", *server.admin_args)
        assert out.returncode == 0, out.stderr
        assert await _key_rows(server, "alice") == 0
        assert await _key_rows(server, "bob") == 11
        assert (await fetch(bob, "alice"))["code"] == "unknown_user"
    finally:
        await close_all(alice, bob)


async def test_a_connection_s_key_frames_are_answered_in_order(server: Any) -> None:
    """A keys_count sent right after a keys_put (whose signatures take a
    while to check) sees the upload."""
    tokens = add_users(server, ["alice"])
    alice = await RawWS.open(server, tokens["alice"])
    try:
        await alice.send(upload(Identity.generate(), ec_ids=range(1, 101), kem_ids=range(1, 101)))
        await alice.send({"type": "keys_count", "ref": "count"})
        answers = [fr for fr in await alice.drain(2.0) if fr["type"] != "keys_low"]
        assert answers == [state(100, 100), {**state(100, 100), "ref": "count"}]
    finally:
        await close_all(alice)
