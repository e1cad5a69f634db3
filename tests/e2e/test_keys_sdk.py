"""The SDK's key-directory transport against a real server (both modes):
``Client.put_keys`` / ``key_counts`` / ``fetch_bundle`` and the ``KeysLow`` event.

The SDK publishes its own keys on connect (roost.client.crypto); these tests
then put keys of a test identity by hand, which replace them on the server
(a new identity replaces every key of the device)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from roost.client import Client, KeyCounts, KeysLow, KeyUpload, RoostError
from tests.e2e.helpers import add_users, close_all, connect, next_of, wait_for_event
from tests.keys_material import Identity, ec_public, kem_public


def upload(ident: Identity, ec: range, kem: range, last: int | None = 9000) -> KeyUpload:
    signed = ec_public()
    return KeyUpload(
        device=1,
        registration=5,
        identity=ident.public,
        signed_id=3,
        signed_key=signed,
        signed_sig=ident.sign(signed),
        prekeys=[(i, ec_public()) for i in ec],
        kem_prekeys=[(i, kem_public(i), ident.sign(kem_public(i))) for i in kem],
        last_resort=None if last is None else (last, kem_public(last), ident.sign(kem_public(last))),
    )


async def test_an_sdk_client_publishes_fetches_and_hears_when_its_keys_run_low(
    server: Any, tmp_path: Path
) -> None:
    tokens = add_users(server, ["alice", "bob", "carol"])
    alice = Client(server.url, tokens["alice"], state_path=tmp_path / "a.db", e2ee=True)
    await alice.connect(timeout=10)
    bob: Client | None = None
    try:
        assert await next_of(alice, KeysLow) == KeysLow(0, 0)  # after welcome: no keys yet
        await asyncio.wait_for(alice.crypto.published.wait(), 15)  # then the SDK published its own
        assert await alice.key_counts() == KeyCounts(100, 100, True)
        ident = Identity.generate()
        # 150 one-time keys of each kind: two frames.
        assert await alice.put_keys(upload(ident, range(1, 151), range(1, 151))) == KeyCounts(150, 150, True)
        assert await alice.key_counts() == KeyCounts(150, 150, True)
        bob = await connect(server, tokens["bob"], tmp_path / "b.db")
        bundle = await bob.fetch_bundle("alice")
        assert (bundle.user, bundle.identity) == ("alice", ident.public)
        (dev,) = bundle.devices
        assert (dev.device, dev.registration, dev.signed_id, dev.prekey_id, dev.kem_id) == (1, 5, 3, 1, 1)
        assert dev.prekey_key is not None and len(dev.prekey_key) == 33
        assert (len(dev.kem_key), dev.kem_last_resort) == (1569, False)
        with pytest.raises(RoostError) as err:
            await bob.fetch_bundle("nobody")
        assert err.value.code == "unknown_user"
        with pytest.raises(RoostError) as err:  # carol never ran a client
            await alice.fetch_bundle("carol")
        assert err.value.code == "no_keys"
        forged = dataclasses.replace(
            upload(ident, range(1, 3), range(1, 3)), identity=Identity.generate().public
        )
        with pytest.raises(RoostError) as err:  # signed by another identity than it names
            await bob.put_keys(forged)
        assert err.value.code == "bad_signature"
    finally:
        await close_all(alice, bob)


async def test_a_fetch_that_leaves_few_keys_tells_the_owner_through_the_sdk(
    server: Any, tmp_path: Path
) -> None:
    tokens = add_users(server, ["alice", "bob"])
    alice = await connect(server, tokens["alice"], tmp_path / "a.db")
    bob = await connect(server, tokens["bob"], tmp_path / "b.db")
    try:
        await asyncio.wait_for(alice.crypto.published.wait(), 15)
        await alice.put_keys(upload(Identity.generate(), range(1, 11), range(1, 21)))
        bundle = await bob.fetch_bundle("alice")
        assert bundle.devices[0].prekey_id == 1
        low, _ = await wait_for_event(alice, lambda e: isinstance(e, KeysLow) and e != KeysLow(0, 0))
        assert low == KeysLow(9, 19)
        with pytest.raises(RoostError) as err:  # the bundle stays rate-limited per requester
            for _ in range(40):
                await bob.fetch_bundle("alice")
        assert err.value.code == "rate_limited"
    finally:
        await close_all(alice, bob)
