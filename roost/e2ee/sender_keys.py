"""Sender Keys for groups, byte-compatible with libsignal's group_cipher.rs / sender_keys.rs.

Chain: message-key seed = HMAC-SHA256(chain key, 0x01), next chain key =
HMAC-SHA256(chain key, 0x02). Message key: HKDF-SHA256(salt none, seed,
info "WhisperGroup") -> 48 bytes = IV (16) || AES-256 key (32); the body is
AES-256-CBC with PKCS#7. Wire (version 3): 0x33 || protobuf || signature,
the signature an XEdDSA signature by the sender's signing key over everything
before it. Message formats byte by byte: docs/security.md.
"""

from __future__ import annotations

import os
import secrets
import uuid

import msgspec

from roost.e2ee import protobuf
from roost.e2ee.errors import DecryptError, DuplicateMessage, E2eeError, InvalidSignature
from roost.e2ee.keys import (
    SIGNATURE_LEN,
    edwards_publics,
    generate_private,
    public_raw,
    serialize_ec,
    sign_with_scalar,
    signing_scalar,
    verify,
)
from roost.e2ee.primitives import aes_cbc_decrypt, aes_cbc_encrypt, hkdf_sha256, hmac_sha256

MESSAGE_VERSION = 3
VERSION_BYTE = (MESSAGE_VERSION << 4) | MESSAGE_VERSION  # 0x33, as libsignal writes it
MAX_FORWARD_JUMPS = 25_000  # libsignal consts.rs: how far ahead a message may be
MAX_MESSAGE_KEYS = 2000  # libsignal consts.rs: skipped keys kept per sender, oldest dropped
_MESSAGE_KEY_SEED = b"\x01"
_CHAIN_KEY_SEED = b"\x02"
_INFO = b"WhisperGroup"

# protobuf field numbers, libsignal proto/wire.proto
_SKM_SCHEMA = {1: protobuf.LENGTH, 2: protobuf.VARINT, 3: protobuf.VARINT, 4: protobuf.LENGTH}
_SKDM_SCHEMA = {
    1: protobuf.LENGTH,
    2: protobuf.VARINT,
    3: protobuf.VARINT,
    4: protobuf.LENGTH,
    5: protobuf.LENGTH,
}

STATE_VERSION = 1


def message_keys(seed: bytes) -> tuple[bytes, bytes]:
    """(IV 16, AES key 32) of a message-key seed."""
    derived = hkdf_sha256(seed, None, _INFO, 48)
    return derived[:16], derived[16:]


def _seed(chain_key: bytes) -> bytes:
    return hmac_sha256(chain_key, _MESSAGE_KEY_SEED)


def _next(chain_key: bytes) -> bytes:
    return hmac_sha256(chain_key, _CHAIN_KEY_SEED)


class _State(msgspec.Struct, array_like=True):
    version: int
    distribution_id: bytes  # 16
    chain_id: int
    iteration: int  # of chain_key: the next message's iteration
    chain_key: bytes
    signing_public: bytes  # 33
    signing_edwards: tuple[bytes, bytes]  # its Edwards forms: saves a conversion per verified message
    signing_scalar: bytes | None  # only in the sender's own record: XEdDSA's signing scalar of the key
    skipped: list[tuple[int, bytes]]  # (iteration, seed), oldest first


class _Parsed(msgspec.Struct):
    distribution_id: uuid.UUID
    chain_id: int
    iteration: int
    ciphertext: bytes


def _check_version(data: bytes) -> None:
    if data[0] >> 4 != MESSAGE_VERSION:
        raise DecryptError(f"unsupported sender key message version {data[0] >> 4}")


def _uuid(value: protobuf.Field | None) -> uuid.UUID:
    if not isinstance(value, bytes) or len(value) != 16:
        raise DecryptError("bad distribution id")
    return uuid.UUID(bytes=value)


def _uint(value: protobuf.Field | None) -> int:
    if not isinstance(value, int):
        raise DecryptError("missing integer field")
    return value


def _bytes(value: protobuf.Field | None) -> bytes:
    if not isinstance(value, bytes):
        raise DecryptError("missing bytes field")
    return value


def parse_message(data: bytes) -> _Parsed:
    """The fields of a SenderKeyMessage (signature not checked here)."""
    if len(data) < 1 + SIGNATURE_LEN:
        raise DecryptError("sender key message too short")
    _check_version(data)
    fields = protobuf.decode(data[1:-SIGNATURE_LEN], _SKM_SCHEMA)
    return _Parsed(_uuid(fields.get(1)), _uint(fields.get(2)), _uint(fields.get(3)), _bytes(fields.get(4)))


def encode_distribution(
    distribution_id: uuid.UUID, chain_id: int, iteration: int, chain_key: bytes, signing: bytes
) -> bytes:
    body = protobuf.encode(
        [(1, distribution_id.bytes), (2, chain_id), (3, iteration), (4, chain_key), (5, signing)]
    )
    return bytes([VERSION_BYTE]) + body


class SenderKeyRecord:
    """One sender's chain for one distribution id: the sender's own (encrypts) or a member's (decrypts)."""

    def __init__(self, state: _State) -> None:
        self._state = state

    @classmethod
    def create(cls, distribution_id: uuid.UUID) -> tuple[SenderKeyRecord, bytes]:
        """A new sending chain (random 31-bit chain id, as libsignal) and its SenderKeyDistributionMessage."""
        signing_private = generate_private()
        state = _State(
            version=STATE_VERSION,
            distribution_id=distribution_id.bytes,
            chain_id=secrets.randbits(31),
            iteration=0,
            chain_key=os.urandom(32),
            signing_public=serialize_ec(public_raw(signing_private)),
            signing_edwards=edwards_publics(serialize_ec(public_raw(signing_private))),
            signing_scalar=signing_scalar(signing_private),
            skipped=[],
        )
        record = cls(state)
        return record, record.distribution_message()

    @classmethod
    def from_distribution(cls, skdm: bytes) -> SenderKeyRecord:
        """A member's record from a SenderKeyDistributionMessage (libsignal's wire format)."""
        if len(skdm) < 1 + 32 + 32:
            raise DecryptError("sender key distribution message too short")
        _check_version(skdm)
        fields = protobuf.decode(skdm[1:], _SKDM_SCHEMA)
        distribution_id = _uuid(fields.get(1))
        chain_key, signing = _bytes(fields.get(4)), _bytes(fields.get(5))
        if len(chain_key) != 32 or len(signing) != 33 or signing[0] != 0x05:
            raise DecryptError("bad chain key or signing key")
        state = _State(
            STATE_VERSION,
            distribution_id.bytes,
            _uint(fields.get(2)),
            _uint(fields.get(3)),
            chain_key,
            signing,
            edwards_publics(signing),
            None,
            [],
        )
        return cls(state)

    @property
    def distribution_id(self) -> uuid.UUID:
        return uuid.UUID(bytes=self._state.distribution_id)

    @property
    def chain_id(self) -> int:
        return self._state.chain_id

    @property
    def iteration(self) -> int:
        return self._state.iteration

    def same_chain(self, skdm: bytes) -> bool:
        """Whether a distribution message names this record's chain (then keep the record: replacing it
        would let messages already read decrypt again)."""
        other = SenderKeyRecord.from_distribution(skdm)._state
        state = self._state
        return (other.distribution_id, other.chain_id, other.signing_public) == (
            state.distribution_id,
            state.chain_id,
            state.signing_public,
        )

    def distribution_message(self) -> bytes:
        """The SKDM at the current iteration (for a member who joins later); own records only."""
        state = self._state
        if state.signing_scalar is None:
            raise E2eeError("only the sender's own record makes a distribution message")
        return encode_distribution(
            self.distribution_id, state.chain_id, state.iteration, state.chain_key, state.signing_public
        )

    def encrypt(self, plaintext: bytes) -> bytes:
        """A signed SenderKeyMessage; advances the chain."""
        state = self._state
        if state.signing_scalar is None:
            raise E2eeError("a record made from a distribution message cannot encrypt")
        if state.iteration >= 2**32 - 1:
            raise E2eeError("sender chain is too long: create a new sender key")
        iv, key = message_keys(_seed(state.chain_key))
        body = protobuf.encode(
            [
                (1, state.distribution_id),
                (2, state.chain_id),
                (3, state.iteration),
                (4, aes_cbc_encrypt(key, iv, plaintext)),
            ]
        )
        content = bytes([VERSION_BYTE]) + body
        message = content + sign_with_scalar(state.signing_scalar, content)
        state.chain_key = _next(state.chain_key)
        state.iteration += 1
        return message

    def decrypt(self, message: bytes) -> bytes:
        """Verify and decrypt a SenderKeyMessage; the record changes only when this returns."""
        state = self._state
        parsed = parse_message(message)
        if parsed.distribution_id.bytes != state.distribution_id or parsed.chain_id != state.chain_id:
            raise DecryptError("no sender key for this distribution id and chain id")
        if not verify(
            state.signing_public, message[:-SIGNATURE_LEN], message[-SIGNATURE_LEN:], state.signing_edwards
        ):
            raise InvalidSignature("sender key message signature does not verify")
        if parsed.iteration < state.iteration:
            return self._decrypt_skipped(parsed)
        jump = parsed.iteration - state.iteration
        if jump > MAX_FORWARD_JUMPS:
            raise DecryptError("sender key message too far into the future")
        # Walk the chain on copies; state is written only after the message decrypted.
        chain_key = state.chain_key
        new_skipped = []
        for iteration in range(state.iteration, parsed.iteration):
            new_skipped.append((iteration, _seed(chain_key)))
            chain_key = _next(chain_key)
        iv, key = message_keys(_seed(chain_key))
        plaintext = aes_cbc_decrypt(key, iv, parsed.ciphertext)
        state.chain_key = _next(chain_key)
        state.iteration = parsed.iteration + 1
        if new_skipped:
            skipped = state.skipped + new_skipped
            state.skipped = skipped[-MAX_MESSAGE_KEYS:]
        return plaintext

    def _decrypt_skipped(self, parsed: _Parsed) -> bytes:
        state = self._state
        for index, (iteration, seed) in enumerate(state.skipped):
            if iteration == parsed.iteration:
                iv, key = message_keys(seed)
                plaintext = aes_cbc_decrypt(key, iv, parsed.ciphertext)
                del state.skipped[index]  # used once: a replay is a DuplicateMessage
                return plaintext
        raise DuplicateMessage(f"sender key iteration {parsed.iteration} already used")

    def to_bytes(self) -> bytes:
        return _ENCODER.encode(self._state)

    @classmethod
    def from_bytes(cls, data: bytes) -> SenderKeyRecord:
        try:
            state = _DECODER.decode(data)
        except msgspec.DecodeError as exc:
            raise E2eeError("corrupt SenderKeyRecord state") from exc
        if state.version != STATE_VERSION or len(state.distribution_id) != 16 or len(state.chain_key) != 32:
            raise E2eeError("unsupported SenderKeyRecord state")
        return cls(state)


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(_State)
