"""Key formats, XEdDSA signatures and the device's own key material (LocalKeys).

Serialisations are libsignal's: an EC public key is 0x05 || X25519 public (33
bytes), a KEM public key is 0x08 || ML-KEM-1024 encapsulation key (1569
bytes), a signature is a 64-byte XEdDSA signature by the identity key over the
serialised public key. Signing is the XEdDSA of Signal's specification (the
`xeddsa` package, libsodium underneath); verification also accepts libsignal's
variant, which carries the sign bit of the Edwards public key in the top bit of
the signature instead of negating the private key (see _ed_public_for).
"""

from __future__ import annotations

import os
import secrets

import msgspec
import xeddsa
from cryptography.hazmat.primitives.asymmetric import mlkem
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from roost.e2ee.errors import DecryptError, E2eeError

EC_TYPE = 0x05  # libsignal's KeyType::Djb (Curve25519)
KEM_TYPE = 0x08  # libsignal's type byte for a 1024-bit Kyber/ML-KEM key (agreed format, see docs/security.md)
EC_PUBLIC_LEN = 33
KEM_PUBLIC_LEN = 1 + 1568
KEM_CIPHERTEXT_LEN = 1568
SIGNATURE_LEN = 64
MAX_KEY_ID = 2**24  # key ids are 0 < id < 2**24, as Signal clients use
MAX_REGISTRATION = 16380

# Signal clients keep a replaced signed prekey for about a month: a PQXDH
# start made from a bundle fetched just before the rotation still decrypts.
SIGNED_PREKEY_GRACE = 30 * 24 * 3600.0


# -- EC keys -----------------------------------------------------------------


def clamp(private: bytes) -> bytes:
    """X25519 clamping (RFC 7748), once at generation as libsignal does: XEdDSA signs with that scalar."""
    key = bytearray(private)
    key[0] &= 248
    key[31] &= 127
    key[31] |= 64
    return bytes(key)


def generate_private() -> bytes:
    return clamp(os.urandom(32))


def public_raw(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def serialize_ec(raw_public: bytes) -> bytes:
    return bytes([EC_TYPE]) + raw_public


def parse_ec(public: bytes) -> bytes:
    """The raw 32-byte X25519 key of a serialised EC public key; DecryptError when malformed."""
    if len(public) != EC_PUBLIC_LEN or public[0] != EC_TYPE:
        raise DecryptError("bad EC public key")
    return public[1:]


def dh(private: bytes, raw_public: bytes) -> bytes:
    """X25519; an all-zero result (a small-order peer key) is refused, as the specs require."""
    try:
        return X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(raw_public)
        )
    except ValueError as exc:
        raise DecryptError("invalid X25519 public key") from exc


# -- KEM keys ----------------------------------------------------------------


def kem_generate() -> tuple[bytes, bytes]:
    """(64-byte ML-KEM-1024 seed, serialised public key 0x08 || 1568)."""
    key = mlkem.MLKEM1024PrivateKey.generate()
    return key.private_bytes_raw(), bytes([KEM_TYPE]) + key.public_key().public_bytes_raw()


def kem_encapsulate(public: bytes) -> tuple[bytes, bytes]:
    """(shared secret 32, ciphertext 1568) for a serialised KEM public key."""
    if len(public) != KEM_PUBLIC_LEN or public[0] != KEM_TYPE:
        raise E2eeError("bad KEM public key")
    try:
        return mlkem.MLKEM1024PublicKey.from_public_bytes(public[1:]).encapsulate()
    except ValueError as exc:
        raise E2eeError("invalid ML-KEM-1024 public key") from exc


def kem_decapsulate(seed: bytes, ciphertext: bytes) -> bytes:
    if len(ciphertext) != KEM_CIPHERTEXT_LEN:
        raise DecryptError("bad KEM ciphertext length")
    return mlkem.MLKEM1024PrivateKey.from_seed_bytes(seed).decapsulate(ciphertext)


# -- XEdDSA ------------------------------------------------------------------


def signing_scalar(private: bytes) -> bytes:
    """XEdDSA's calculate_key_pair: the scalar, negated if needed so that its Edwards key has sign bit 0.

    A scalar multiplication: a key that signs often (a sender key) keeps the result.
    """
    return bytes(xeddsa.priv_force_sign(private, False))


def sign_with_scalar(scalar: bytes, message: bytes) -> bytes:
    """XEdDSA signature (64 bytes) by a signing_scalar(), 64 fresh random bytes as nonce."""
    return bytes(xeddsa.ed25519_priv_sign(scalar, message, os.urandom(64)))


def sign(private: bytes, message: bytes) -> bytes:
    """XEdDSA signature (64 bytes) with an X25519 private key."""
    return sign_with_scalar(signing_scalar(private), message)


def edwards_publics(public: bytes) -> tuple[bytes, bytes]:
    """The Edwards forms (sign bit 0, sign bit 1) of a serialised EC public key, for verify()."""
    try:
        even = bytes(xeddsa.curve25519_pub_to_ed25519_pub(public[1:], False))
        odd = bytes(xeddsa.curve25519_pub_to_ed25519_pub(public[1:], True))
    except xeddsa.XEdDSAException as exc:
        raise DecryptError("invalid signing key") from exc
    return even, odd


def verify(
    public: bytes, message: bytes, signature: bytes, edwards: tuple[bytes, bytes] | None = None
) -> bool:
    """Verify an XEdDSA signature by a serialised EC public key (33 bytes); `edwards`: edwards_publics()."""
    if len(public) != EC_PUBLIC_LEN or public[0] != EC_TYPE or len(signature) != SIGNATURE_LEN:
        return False
    # libsignal stores the Edwards sign bit in the signature's top bit; the
    # specification's XEdDSA always has it 0 (its s < 2**253), so reading the
    # bit from the signature verifies both.
    sign_bit = bool(signature[63] & 0x80)
    s_and_r = bytearray(signature)
    s_and_r[63] &= 0x7F
    if s_and_r[63] & 0xE0:  # s must be reduced: same check as libsignal
        return False
    try:
        if edwards is None:
            ed_public = xeddsa.curve25519_pub_to_ed25519_pub(public[1:], sign_bit)
        else:
            ed_public = edwards[sign_bit]
        return bool(xeddsa.ed25519_verify(bytes(s_and_r), ed_public, message))
    except xeddsa.XEdDSAException:
        return False


# -- LocalKeys ---------------------------------------------------------------

LOCAL_KEYS_VERSION = 1


class _SignedPreKey(msgspec.Struct, array_like=True):
    id: int
    private: bytes
    public: bytes  # serialised, 33
    sig: bytes
    created: float
    replaced: float | None = None  # when a newer one took over


class _KemPreKey(msgspec.Struct, array_like=True):
    id: int
    seed: bytes  # 64-byte ML-KEM-1024 seed
    public: bytes  # serialised, 1569
    sig: bytes


class _LocalState(msgspec.Struct, array_like=True):
    version: int
    device: int
    registration: int
    identity_private: bytes
    signed: list[_SignedPreKey]  # newest last
    prekeys: dict[int, bytes]  # one-time EC: id -> private
    kem_prekeys: dict[int, bytes]  # one-time KEM: id -> seed
    last_resort: _KemPreKey | None
    next_signed_id: int
    next_prekey_id: int
    next_kem_id: int


def _random_key_id() -> int:
    return secrets.randbelow(MAX_KEY_ID - 1) + 1


def _next_id(current: int) -> int:
    return current % (MAX_KEY_ID - 1) + 1  # 1 .. 2**24-1, wrapping past 0


class LocalKeys:
    """The device's own keys: identity, signed prekeys, one-time EC and KEM prekeys, last-resort KEM key."""

    def __init__(self, state: _LocalState) -> None:
        self._state = state
        self._identity_public = serialize_ec(public_raw(state.identity_private))

    @classmethod
    def generate(cls, device: int = 1) -> LocalKeys:
        start = _random_key_id()
        state = _LocalState(
            version=LOCAL_KEYS_VERSION,
            device=device,
            registration=secrets.randbelow(MAX_REGISTRATION) + 1,
            identity_private=generate_private(),
            signed=[],
            prekeys={},
            kem_prekeys={},
            last_resort=None,
            next_signed_id=start,
            next_prekey_id=_random_key_id(),
            next_kem_id=_random_key_id(),
        )
        return cls(state)

    @property
    def identity_public(self) -> bytes:
        return self._identity_public

    @property
    def registration(self) -> int:
        return self._state.registration

    @property
    def device(self) -> int:
        return self._state.device

    def sign(self, message: bytes) -> bytes:
        return sign(self._state.identity_private, message)

    def new_signed_prekey(self, now: float) -> tuple[int, bytes, bytes]:
        """A new current signed prekey; older ones stay SIGNED_PREKEY_GRACE seconds after replacement."""
        state = self._state
        for old in state.signed:
            if old.replaced is None:
                old.replaced = now
        state.signed = [
            k for k in state.signed if k.replaced is None or now - k.replaced < SIGNED_PREKEY_GRACE
        ]
        private = generate_private()
        public = serialize_ec(public_raw(private))
        key = _SignedPreKey(state.next_signed_id, private, public, self.sign(public), now)
        state.next_signed_id = _next_id(state.next_signed_id)
        state.signed.append(key)
        return key.id, key.public, key.sig

    def signed_prekey_age(self, now: float) -> float:
        """Seconds since the current signed prekey was made; infinity when there is none yet."""
        if not self._state.signed:
            return float("inf")
        return now - self._state.signed[-1].created

    def new_prekeys(self, count: int) -> list[tuple[int, bytes]]:
        out = []
        for _ in range(count):
            private = generate_private()
            key_id = self._state.next_prekey_id
            self._state.next_prekey_id = _next_id(key_id)
            self._state.prekeys[key_id] = private
            out.append((key_id, serialize_ec(public_raw(private))))
        return out

    def new_kem_prekeys(self, count: int) -> list[tuple[int, bytes, bytes]]:
        out = []
        for _ in range(count):
            seed, public = kem_generate()
            key_id = self._state.next_kem_id
            self._state.next_kem_id = _next_id(key_id)
            self._state.kem_prekeys[key_id] = seed
            out.append((key_id, public, self.sign(public)))
        return out

    def last_resort_kem(self) -> tuple[int, bytes, bytes]:
        state = self._state
        if state.last_resort is None:
            seed, public = kem_generate()
            state.last_resort = _KemPreKey(state.next_kem_id, seed, public, self.sign(public))
            state.next_kem_id = _next_id(state.next_kem_id)
        key = state.last_resort
        return key.id, key.public, key.sig

    # -- used by Session.respond (same package) ------------------------------

    @property
    def identity_private(self) -> bytes:
        return self._state.identity_private

    def signed_prekey_private(self, key_id: int) -> bytes:
        for key in self._state.signed:
            if key.id == key_id:
                return key.private
        raise DecryptError(f"unknown signed prekey {key_id}")

    def prekey_private(self, key_id: int) -> bytes:
        try:
            return self._state.prekeys[key_id]
        except KeyError:
            raise DecryptError(f"unknown one-time prekey {key_id}") from None

    def kem_seed(self, key_id: int) -> bytes:
        seed = self._state.kem_prekeys.get(key_id)
        if seed is not None:
            return seed
        last = self._state.last_resort
        if last is not None and last.id == key_id:
            return last.seed
        raise DecryptError(f"unknown KEM prekey {key_id}")

    def consume(self, prekey_id: int | None, kem_id: int) -> None:
        """Delete the one-time keys a successfully decrypted PreKey message used (never the last resort)."""
        if prekey_id is not None:
            self._state.prekeys.pop(prekey_id, None)
        self._state.kem_prekeys.pop(kem_id, None)

    def prekey_count(self) -> tuple[int, int]:
        """(one-time EC, one-time KEM) private keys still held."""
        return len(self._state.prekeys), len(self._state.kem_prekeys)

    # -- serialisation ---------------------------------------------------------

    def to_bytes(self) -> bytes:
        return _ENCODER.encode(self._state)

    @classmethod
    def from_bytes(cls, data: bytes) -> LocalKeys:
        try:
            state = _LOCAL_DECODER.decode(data)
        except msgspec.DecodeError as exc:
            raise E2eeError("corrupt LocalKeys state") from exc
        if state.version != LOCAL_KEYS_VERSION or len(state.identity_private) != 32:
            raise E2eeError(f"unsupported LocalKeys state version {state.version}")
        return cls(state)


_ENCODER = msgspec.msgpack.Encoder()
_LOCAL_DECODER = msgspec.msgpack.Decoder(_LocalState)
