"""The key directory as the SDK sees it: plain dataclasses, no crypto.

``Client.put_keys`` / ``key_counts`` / ``fetch_bundle`` move these over the
wire (docs/protocol.md, "Key directory"); what the keys are and how they are
made is ``roost.e2ee``'s business. Keys are libsignal's serialisations: EC
public keys 33 bytes (0x05 || X25519), KEM public keys 1569 bytes (0x08 ||
ML-KEM-1024), XEdDSA signatures 64 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from roost.protocol import frames as f


@dataclass(slots=True, frozen=True)
class KeyCounts:
    """One-time keys the server holds for this device; ``has_identity``: it published keys."""

    ec: int
    kem: int
    has_identity: bool


@dataclass(slots=True, frozen=True)
class KeyUpload:
    """What ``put_keys`` publishes. ``last_resort`` None keeps the stored one
    (a first upload, or one with a new identity, must carry it). More than
    ``MAX_KEYS_PER_FRAME`` one-time keys of a kind go out in several frames."""

    device: int
    registration: int
    identity: bytes
    signed_id: int
    signed_key: bytes
    signed_sig: bytes
    prekeys: list[tuple[int, bytes]] = field(default_factory=list)  # (id, public33)
    kem_prekeys: list[tuple[int, bytes, bytes]] = field(default_factory=list)  # (id, public1569, sig)
    last_resort: tuple[int, bytes, bytes] | None = None


@dataclass(slots=True, frozen=True)
class DeviceBundle:
    """One device of a fetched bundle. ``prekey_id``/``prekey_key`` are None
    once its one-time EC keys are gone; ``kem_*`` is then maybe the
    last-resort key (``kem_last_resort``)."""

    device: int
    registration: int
    signed_id: int
    signed_key: bytes
    signed_sig: bytes
    prekey_id: int | None
    prekey_key: bytes | None
    kem_id: int
    kem_key: bytes
    kem_sig: bytes
    kem_last_resort: bool


@dataclass(slots=True, frozen=True)
class PreKeyBundle:
    user: str
    identity: bytes
    devices: list[DeviceBundle]


MAX_KEYS_PER_FRAME = f.MAX_KEYS_PER_FRAME


def upload_frames(upload: KeyUpload) -> list[f.KeysPut]:
    """The keys_put frames of ``upload``: every frame carries the identity,
    the signed key and the last-resort key, the one-time keys in slices."""
    n = MAX_KEYS_PER_FRAME
    slices = max(1, -(-len(upload.prekeys) // n), -(-len(upload.kem_prekeys) // n))
    last = upload.last_resort
    return [
        f.KeysPut(
            registration=upload.registration,
            identity=upload.identity,
            signed=f.SignedPreKey(id=upload.signed_id, key=upload.signed_key, sig=upload.signed_sig),
            prekeys=[f.PreKey(id=i, key=k) for i, k in upload.prekeys[s * n : (s + 1) * n]],
            kem_prekeys=[
                f.KemPreKey(id=i, key=k, sig=sig) for i, k, sig in upload.kem_prekeys[s * n : (s + 1) * n]
            ],
            last_resort=None if last is None else f.KemPreKey(id=last[0], key=last[1], sig=last[2]),
            device=upload.device,
        )
        for s in range(slices)
    ]


def bundle_of(frame: f.KeysBundle) -> PreKeyBundle:
    return PreKeyBundle(
        frame.user,
        frame.identity,
        [
            DeviceBundle(
                d.device,
                d.registration,
                d.signed.id,
                d.signed.key,
                d.signed.sig,
                None if d.prekey is None else d.prekey.id,
                None if d.prekey is None else d.prekey.key,
                d.kem.id,
                d.kem.key,
                d.kem.sig,
                d.kem_last_resort,
            )
            for d in frame.devices
        ],
    )
