"""The Double Ratchet (Signal's specification) for one pairwise session, started by PQXDH.

KDF_RK(rk, dh) = HKDF-SHA256(salt = rk, IKM = dh, info "Roost_Ratchet_RootKey") -> 64 bytes: rk', ck.
KDF_CK(ck): message key = HMAC-SHA256(ck, 0x01), next ck = HMAC-SHA256(ck, 0x02).
Message key mk -> HKDF-SHA256(salt = 32 zero bytes, IKM = mk, info "Roost_Ratchet_MessageKeys")
-> 80 bytes: AES-256 key || HMAC key || IV; body AES-256-CBC with PKCS#7; MAC =
HMAC-SHA256(HMAC key, AD || [PreKey header] || header || ciphertext), first 8 bytes.

Messages (not libsignal's wire format: libsignal now requires SPQR in its 1:1
ratchet), all integers big-endian:
  normal  = 0x11 || ratchet key (32) || PN u32 || N u32 || ciphertext || MAC (8)
  PreKey  = 0x12 || registration u32 || identity (33) || base key (33) || signed prekey id u32
            || one-time prekey id u32 (0: none) || KEM prekey id u32 || KEM ciphertext (1568) || normal
The MAC of the inner normal message also covers the PreKey header, so every
byte of every message is authenticated. Details: docs/security.md.
"""

from __future__ import annotations

import struct
from typing import Protocol

import msgspec
from cryptography.hazmat.primitives import constant_time

from roost.e2ee import pqxdh
from roost.e2ee.errors import DecryptError, DuplicateMessage, E2eeError, InvalidSignature, UnknownSession
from roost.e2ee.keys import (
    EC_PUBLIC_LEN,
    EC_TYPE,
    KEM_CIPHERTEXT_LEN,
    KEM_PUBLIC_LEN,
    KEM_TYPE,
    LocalKeys,
    dh,
    generate_private,
    parse_ec,
    public_raw,
    verify,
)
from roost.e2ee.primitives import aes_cbc_decrypt, aes_cbc_encrypt, hkdf_sha256, hmac_sha256

NORMAL = 0x11  # version 1, type 1
PREKEY = 0x12  # version 1, type 2
MAC_LEN = 8
MAX_SKIP = 2000  # skipped message keys kept per session, and the furthest a message may be ahead
# Earlier receiving ratchet keys kept (32 bytes each) so that a late duplicate
# from an old chain is told apart from a forgery: DuplicateMessage, not DecryptError.
MAX_OLD_CHAINS = 20
STATE_VERSION = 1

_HEADER = struct.Struct(">B32sII")
_PREKEY_HEADER = struct.Struct(f">BI{EC_PUBLIC_LEN}s{EC_PUBLIC_LEN}sIII{KEM_CIPHERTEXT_LEN}s")
_ROOT_INFO = b"Roost_Ratchet_RootKey"
_KEYS_INFO = b"Roost_Ratchet_MessageKeys"
_ZERO_SALT = b"\x00" * 32
_MIN_NORMAL = _HEADER.size + 16 + MAC_LEN


class DeviceBundleLike(Protocol):
    """What Session.initiate reads of a fetched bundle (roost.client.keys.DeviceBundle has these fields)."""

    @property
    def registration(self) -> int: ...
    @property
    def signed_id(self) -> int: ...
    @property
    def signed_key(self) -> bytes: ...
    @property
    def signed_sig(self) -> bytes: ...
    @property
    def prekey_id(self) -> int | None: ...
    @property
    def prekey_key(self) -> bytes | None: ...
    @property
    def kem_id(self) -> int: ...
    @property
    def kem_key(self) -> bytes: ...
    @property
    def kem_sig(self) -> bytes: ...


def kdf_rk(root_key: bytes, dh_out: bytes) -> tuple[bytes, bytes]:
    derived = hkdf_sha256(dh_out, root_key, _ROOT_INFO, 64)
    return derived[:32], derived[32:]


def kdf_ck(chain_key: bytes) -> tuple[bytes, bytes]:
    """(next chain key, message key)."""
    return hmac_sha256(chain_key, b"\x02"), hmac_sha256(chain_key, b"\x01")


def _message_keys(message_key: bytes) -> tuple[bytes, bytes, bytes]:
    derived = hkdf_sha256(message_key, _ZERO_SALT, _KEYS_INFO, 80)
    return derived[:32], derived[32:64], derived[64:]


def _seal(message_key: bytes, header: bytes, plaintext: bytes, associated: bytes) -> bytes:
    enc_key, mac_key, iv = _message_keys(message_key)
    ciphertext = aes_cbc_encrypt(enc_key, iv, plaintext)
    return header + ciphertext + hmac_sha256(mac_key, associated + header + ciphertext)[:MAC_LEN]


def _open(message_key: bytes, message: bytes, associated: bytes) -> bytes:
    """Check the MAC first, then decrypt; DecryptError on any mismatch."""
    enc_key, mac_key, iv = _message_keys(message_key)
    header, ciphertext, mac = message[: _HEADER.size], message[_HEADER.size : -MAC_LEN], message[-MAC_LEN:]
    expected = hmac_sha256(mac_key, associated + header + ciphertext)[:MAC_LEN]
    if not constant_time.bytes_eq(expected, mac):
        raise DecryptError("bad MAC")
    return aes_cbc_decrypt(enc_key, iv, ciphertext)


class _State(msgspec.Struct, array_like=True):
    version: int
    remote_user: str
    remote_identity: bytes  # 33
    remote_registration: int
    associated: bytes  # AD = IK_initiator || IK_responder (66)
    base_key: bytes  # the PQXDH base key (33): names the session on both sides
    root_key: bytes
    dhs_private: bytes
    dhs_public: bytes  # raw 32
    dhr: bytes | None  # raw 32
    cks: bytes | None
    ckr: bytes | None
    ns: int
    nr: int
    pn: int
    pending: bytes | None  # initiator: the PreKey header sent until the peer's first reply decrypts
    skipped: list[tuple[bytes, int, bytes]]  # (ratchet key, N, message key), oldest first
    old_chains: list[bytes]  # earlier receiving ratchet keys, newest last


class _Step(msgspec.Struct):
    """What a successful decrypt writes into the state (computed before anything is written)."""

    root_key: bytes
    dhs_private: bytes
    dhs_public: bytes
    dhr: bytes
    cks: bytes | None
    ckr: bytes
    ns: int
    nr: int
    pn: int
    skipped: list[tuple[bytes, int, bytes]]
    retired_chain: bytes | None


def _parse_prekey(message: bytes) -> tuple[tuple[int, bytes, bytes, int, int, int, bytes], bytes, bytes]:
    """(fields, PreKey header bytes, inner normal message)."""
    if len(message) < _PREKEY_HEADER.size + _MIN_NORMAL:
        raise DecryptError("PreKey message too short")
    header = message[: _PREKEY_HEADER.size]
    _, registration, identity, base_key, signed_id, prekey_id, kem_id, kem_ciphertext = _PREKEY_HEADER.unpack(
        header
    )
    if identity[0] != EC_TYPE or base_key[0] != EC_TYPE:
        raise DecryptError("bad key type in PreKey message")
    return (
        (registration, identity, base_key, signed_id, prekey_id, kem_id, kem_ciphertext),
        header,
        message[len(header) :],
    )


def _parse_normal(message: bytes) -> tuple[bytes, int, int]:
    """(ratchet key, PN, N) of a normal message."""
    if len(message) < _MIN_NORMAL or (len(message) - _HEADER.size - MAC_LEN) % 16:
        raise DecryptError("message length is not a whole number of blocks")
    kind, ratchet_key, pn, n = _HEADER.unpack_from(message)
    if kind != NORMAL:
        raise DecryptError(f"unknown message type {kind:#x}")
    return ratchet_key, pn, n


def _chain_keys(
    chain_key: bytes, ratchet_key: bytes, start: int, until: int
) -> tuple[bytes, list[tuple[bytes, int, bytes]]]:
    """Walk a receiving chain from message `start` to `until`: (chain key at `until`, keys on the way)."""
    skipped = []
    for n in range(start, until):
        chain_key, message_key = kdf_ck(chain_key)
        skipped.append((ratchet_key, n, message_key))
    return chain_key, skipped


class Session:
    """One pairwise Double Ratchet session with one remote device; mutated only by a successful call."""

    def __init__(self, state: _State) -> None:
        self._state = state
        self._skipped = {(key, n): mk for key, n, mk in state.skipped}

    # -- starting ------------------------------------------------------------

    @classmethod
    def initiate(
        cls, local: LocalKeys, remote_user: str, bundle_identity: bytes, device: DeviceBundleLike
    ) -> Session:
        """PQXDH as initiator from a fetched bundle; InvalidSignature when a prekey signature is bad."""
        identity = _bundle_ec(bundle_identity)
        signed = _bundle_ec(device.signed_key)
        if len(device.kem_key) != KEM_PUBLIC_LEN or device.kem_key[0] != KEM_TYPE:
            raise E2eeError("bad KEM key in bundle")
        if not verify(bundle_identity, device.signed_key, device.signed_sig):
            raise InvalidSignature("signed prekey signature does not verify")
        if not verify(bundle_identity, device.kem_key, device.kem_sig):
            raise InvalidSignature("KEM prekey signature does not verify")
        one_time = None
        if device.prekey_key is not None and device.prekey_id is not None:
            one_time = _bundle_ec(device.prekey_key)
        root, base_key, kem_ciphertext = pqxdh.initiate(
            local.identity_private, identity, signed, one_time, device.kem_key
        )
        pending = _PREKEY_HEADER.pack(
            PREKEY,
            local.registration,
            local.identity_public,
            base_key,
            device.signed_id,
            device.prekey_id if one_time is not None and device.prekey_id is not None else 0,
            device.kem_id,
            kem_ciphertext,
        )
        dhs_private = generate_private()
        root_key, cks = kdf_rk(root, dh(dhs_private, signed))
        state = _State(
            version=STATE_VERSION,
            remote_user=remote_user,
            remote_identity=bundle_identity,
            remote_registration=device.registration,
            associated=local.identity_public + bundle_identity,
            base_key=base_key,
            root_key=root_key,
            dhs_private=dhs_private,
            dhs_public=public_raw(dhs_private),
            dhr=signed,
            cks=cks,
            ckr=None,
            ns=0,
            nr=0,
            pn=0,
            pending=pending,
            skipped=[],
            old_chains=[],
        )
        return cls(state)

    @classmethod
    def respond(cls, local: LocalKeys, remote_user: str, message: bytes) -> tuple[Session, bytes]:
        """PQXDH as responder from a PreKey message; consumes its one-time keys once it decrypts."""
        if not cls.is_prekey_message(message):
            raise DecryptError("not a PreKey message")
        fields, _, _ = _parse_prekey(message)
        registration, identity, base_key, signed_id, prekey_id, kem_id, kem_ciphertext = fields
        signed_private = local.signed_prekey_private(signed_id)
        one_time = local.prekey_private(prekey_id) if prekey_id else None
        root = pqxdh.respond(
            local.identity_private,
            signed_private,
            one_time,
            local.kem_seed(kem_id),
            parse_ec(identity),
            parse_ec(base_key),
            kem_ciphertext,
        )
        state = _State(
            version=STATE_VERSION,
            remote_user=remote_user,
            remote_identity=identity,
            remote_registration=registration,
            associated=identity + local.identity_public,
            base_key=base_key,
            root_key=root,
            dhs_private=signed_private,
            dhs_public=public_raw(signed_private),
            dhr=None,
            cks=None,
            ckr=None,
            ns=0,
            nr=0,
            pn=0,
            pending=None,
            skipped=[],
            old_chains=[],
        )
        session = cls(state)
        plaintext = session.decrypt(message)
        local.consume(prekey_id or None, kem_id)
        return session, plaintext

    # -- properties ----------------------------------------------------------

    @property
    def remote_identity(self) -> bytes:
        return self._state.remote_identity

    @property
    def remote_user(self) -> str:
        return self._state.remote_user

    @property
    def remote_registration(self) -> int:
        return self._state.remote_registration

    @property
    def base_key(self) -> bytes:
        return self._state.base_key

    @staticmethod
    def is_prekey_message(message: bytes) -> bool:
        return message[:1] == bytes([PREKEY])

    # -- messages ------------------------------------------------------------

    def encrypt(self, plaintext: bytes) -> bytes:
        state = self._state
        if state.cks is None:
            raise E2eeError("no sending chain yet")
        if state.ns >= 2**32 - 1:
            raise E2eeError("sending chain exhausted")
        state.cks, message_key = kdf_ck(state.cks)
        header = _HEADER.pack(NORMAL, state.dhs_public, state.pn, state.ns)
        state.ns += 1
        prefix = state.pending or b""
        return prefix + _seal(message_key, header, plaintext, state.associated + prefix)

    def decrypt(self, message: bytes) -> bytes:
        """Decrypt a normal or PreKey message of this session; any error leaves the session as it was."""
        state = self._state
        prefix = b""
        if self.is_prekey_message(message):
            fields, prefix, message = _parse_prekey(message)
            if fields[2] != state.base_key or fields[1] != state.remote_identity:
                raise UnknownSession("PreKey message of another session")
        ratchet_key, pn, n = _parse_normal(message)
        associated = state.associated + prefix
        message_key = self._skipped.get((ratchet_key, n))
        if message_key is not None:
            plaintext = _open(message_key, message, associated)
            del self._skipped[(ratchet_key, n)]  # used once: a replay is a DuplicateMessage
            self._peer_replied(prefix)
            return plaintext
        step = self._plan(ratchet_key, pn, n)
        _, _, message_key = step.skipped.pop()
        plaintext = _open(message_key, message, associated)
        self._commit(step)
        self._peer_replied(prefix)
        return plaintext

    def _plan(self, ratchet_key: bytes, pn: int, n: int) -> _Step:
        """The state after receiving (ratchet_key, n), not written yet; the last skipped entry is its key."""
        state = self._state
        if ratchet_key == state.dhr and state.ckr is not None:
            if n < state.nr:
                raise DuplicateMessage(f"message {n} of this chain was already decrypted")
            if n - state.nr > MAX_SKIP:
                raise DecryptError("message too far ahead")
            ckr, chain = _chain_keys(state.ckr, ratchet_key, state.nr, n + 1)
            return _Step(
                state.root_key, state.dhs_private, state.dhs_public, ratchet_key, state.cks, ckr,
                state.ns, n + 1, state.pn, chain, None,
            )  # fmt: skip
        if ratchet_key in state.old_chains:
            raise DuplicateMessage("message of an earlier chain was already decrypted")
        skipped: list[tuple[bytes, int, bytes]] = []
        if state.dhr is not None and state.ckr is not None:
            if pn < state.nr or pn - state.nr + n > MAX_SKIP:
                raise DecryptError("message too far ahead")
            _, skipped = _chain_keys(state.ckr, state.dhr, state.nr, pn)
        elif n > MAX_SKIP:
            raise DecryptError("message too far ahead")
        # DH ratchet step (spec 3.5): a new receiving chain, then a new sending key pair and chain.
        root_key, ckr = kdf_rk(state.root_key, dh(state.dhs_private, ratchet_key))
        dhs_private = generate_private()
        root_key, cks = kdf_rk(root_key, dh(dhs_private, ratchet_key))
        ckr, new_chain = _chain_keys(ckr, ratchet_key, 0, n + 1)
        retired = state.dhr if state.ckr is not None else None
        return _Step(
            root_key, dhs_private, public_raw(dhs_private), ratchet_key, cks, ckr, 0, n + 1, state.ns,
            skipped + new_chain, retired,
        )  # fmt: skip

    def _commit(self, step: _Step) -> None:
        state = self._state
        state.root_key, state.dhs_private, state.dhs_public = step.root_key, step.dhs_private, step.dhs_public
        state.dhr, state.cks, state.ckr = step.dhr, step.cks, step.ckr
        state.ns, state.nr, state.pn = step.ns, step.nr, step.pn
        if step.retired_chain is not None:
            state.old_chains = [*state.old_chains, step.retired_chain][-MAX_OLD_CHAINS:]
        for key, n, message_key in step.skipped:
            self._skipped[(key, n)] = message_key
        while len(self._skipped) > MAX_SKIP:  # oldest dropped, as libsignal does
            del self._skipped[next(iter(self._skipped))]

    def _peer_replied(self, prefix: bytes) -> None:
        # A normal message from the peer proves it has the session: stop sending PreKey messages.
        if not prefix:
            self._state.pending = None

    # -- persistence ---------------------------------------------------------

    def to_bytes(self) -> bytes:
        # The skipped keys live in a dict for O(1) lookups; the list is written only here.
        self._state.skipped = [(key, n, mk) for (key, n), mk in self._skipped.items()]
        return _ENCODER.encode(self._state)

    @classmethod
    def from_bytes(cls, data: bytes) -> Session:
        try:
            state = _DECODER.decode(data)
        except msgspec.DecodeError as exc:
            raise E2eeError("corrupt Session state") from exc
        if (
            state.version != STATE_VERSION
            or len(state.root_key) != 32
            or len(state.remote_identity) != EC_PUBLIC_LEN
        ):
            raise E2eeError("unsupported Session state")
        return cls(state)


def _bundle_ec(public: bytes) -> bytes:
    if len(public) != EC_PUBLIC_LEN or public[0] != EC_TYPE:
        raise E2eeError("bad EC key in bundle")
    return public[1:]


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(_State)
