"""Shared helpers for the roost.e2ee tests."""

from __future__ import annotations

from hypothesis import strategies as st

from roost.client.keys import DeviceBundle as Bundle
from roost.e2ee import LocalKeys


def publish(local: LocalKeys, one_time_ec: bool = True, last_resort: bool = False) -> Bundle:
    """Publish a signed prekey, a one-time EC key and a KEM key (or the last resort): a server's bundle."""
    signed_id, signed_key, signed_sig = local.new_signed_prekey(0.0)
    prekey_id, prekey_key = local.new_prekeys(1)[0] if one_time_ec else (None, None)
    kem_id, kem_key, kem_sig = local.last_resort_kem() if last_resort else local.new_kem_prekeys(1)[0]
    return Bundle(
        local.device,
        local.registration,
        signed_id,
        signed_key,
        signed_sig,
        prekey_id,
        prekey_key,
        kem_id,
        kem_key,
        kem_sig,
        last_resort,
    )


def damage(message: bytes, data: st.DataObject) -> bytes:
    """One flipped bit or a truncation anywhere (drawn independently of the message length)."""
    where = data.draw(st.integers(0, 2**20))
    if data.draw(st.booleans()):
        position = where % (len(message) * 8)
        damaged = bytearray(message)
        damaged[position // 8] ^= 1 << (position % 8)
        return bytes(damaged)
    return message[: where % len(message)]
