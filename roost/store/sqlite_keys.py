"""The key directory in the embedded store (SQLite schema 4).

Functions over the writer's connection (``put_keys``, ``take_keys``,
``delete_keys``: they run inside the writer thread's batch transaction, so a
handout is answered only after its COMMIT) or a reader's (``key_stock``).
The writer thread is the only writer, so a handout is atomic by
construction: no two batches run at once.

A refusal raises ``ProtocolError`` before the first write: a batch's
transaction keeps whatever an op wrote before it raised.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import Any

from roost.core.prekeys import MAX_STOCK
from roost.protocol.errors import ErrorCode, ProtocolError
from roost.store.base import REMOVED, DeviceKeys, KeyStock, KeyUpload

# Per (user, device): the identity, registration id, signed prekey and
# last-resort KEM key; the one-time keys in their own tables, handed out
# lowest id first. KEM rows are ~1.7 KB, too large for a WITHOUT ROWID table.
KEYS_SCHEMA = """
CREATE TABLE IF NOT EXISTS key_devices (
    user TEXT NOT NULL,
    device INTEGER NOT NULL,
    registration INTEGER NOT NULL,
    identity BLOB NOT NULL,
    signed_id INTEGER NOT NULL,
    signed_key BLOB NOT NULL,
    signed_sig BLOB NOT NULL,
    last_id INTEGER NOT NULL,
    last_key BLOB NOT NULL,
    last_sig BLOB NOT NULL,
    PRIMARY KEY (user, device)
);
CREATE TABLE IF NOT EXISTS key_prekeys (
    user TEXT NOT NULL,
    device INTEGER NOT NULL,
    id INTEGER NOT NULL,
    key BLOB NOT NULL,
    PRIMARY KEY (user, device, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS key_kem_prekeys (
    user TEXT NOT NULL,
    device INTEGER NOT NULL,
    id INTEGER NOT NULL,
    key BLOB NOT NULL,
    sig BLOB NOT NULL,
    PRIMARY KEY (user, device, id)
);
"""


def _require_user(c: sqlite3.Connection, user: str) -> None:
    row = c.execute("SELECT state FROM users WHERE name=?", (user,)).fetchone()
    if row is None or row[0] == REMOVED:
        raise ProtocolError(ErrorCode.UNKNOWN_USER, f"no such user: {user}")


def _count(c: sqlite3.Connection, table: str, user: str, device: int) -> int:
    row = c.execute(f"SELECT count(*) FROM {table} WHERE user=? AND device=?", (user, device)).fetchone()
    return int(row[0])


def _stored_ids(c: sqlite3.Connection, table: str, user: str, device: int, ids: list[int]) -> list[int]:
    found: list[int] = []
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        found += [
            r[0]
            for r in c.execute(
                f"SELECT id FROM {table} WHERE user=? AND device=? AND id IN ({marks})",
                (user, device, *chunk),
            )
        ]
    return found


def _refuse_taken(ids: Iterable[int], what: str, ref: str = "") -> None:
    taken = sorted(ids)
    if taken:
        raise ProtocolError(ErrorCode.DUPLICATE_KEY_ID, f"{what} id {taken[0]} is already stored", ref)


def _refuse_overflow(have: int, adding: int, what: str) -> None:
    if have + adding > MAX_STOCK:
        raise ProtocolError(
            ErrorCode.TOO_MANY_KEYS, f"{what}: {have} stored + {adding} new is over {MAX_STOCK}"
        )


def put_keys(c: sqlite3.Connection, up: KeyUpload) -> KeyStock:
    _require_user(c, up.user)
    row = c.execute(
        "SELECT identity, last_id FROM key_devices WHERE user=? AND device=?", (up.user, up.device)
    ).fetchone()
    replace = row is None or bytes(row[0]) != up.identity
    if replace and up.last_resort is None:
        raise ProtocolError(
            ErrorCode.INVALID, "a first upload (or a new identity) must carry a last_resort key"
        )
    ec_ids = [i for i, _ in up.prekeys]
    kem_ids = [i for i, _, _ in up.kem_prekeys]
    ec_have = kem_have = 0
    if not replace:
        assert row is not None
        last_id = up.last_resort[0] if up.last_resort is not None else row[1]
        _refuse_taken(_stored_ids(c, "key_prekeys", up.user, up.device, ec_ids), "prekey")
        _refuse_taken(_stored_ids(c, "key_kem_prekeys", up.user, up.device, kem_ids), "kem prekey")
        _refuse_taken({last_id} & set(kem_ids), "kem prekey (the last-resort key's)")
        if up.last_resort is not None:
            _refuse_taken(_stored_ids(c, "key_kem_prekeys", up.user, up.device, [last_id]), "last_resort")
        ec_have = _count(c, "key_prekeys", up.user, up.device)
        kem_have = _count(c, "key_kem_prekeys", up.user, up.device)
    _refuse_overflow(ec_have, len(ec_ids), "prekeys")
    _refuse_overflow(kem_have, len(kem_ids), "kem prekeys")
    # Every check passed: from here on only writes.
    if replace:
        assert up.last_resort is not None
        delete_keys(c, up.user, up.device)
        c.execute(
            "INSERT INTO key_devices (user, device, registration, identity,"
            " signed_id, signed_key, signed_sig, last_id, last_key, last_sig) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (up.user, up.device, up.registration, up.identity, *up.signed, *up.last_resort),
        )
    else:
        c.execute(
            "UPDATE key_devices SET registration=?, signed_id=?, signed_key=?, signed_sig=?"
            " WHERE user=? AND device=?",
            (up.registration, *up.signed, up.user, up.device),
        )
        if up.last_resort is not None:
            c.execute(
                "UPDATE key_devices SET last_id=?, last_key=?, last_sig=? WHERE user=? AND device=?",
                (*up.last_resort, up.user, up.device),
            )
    c.executemany(
        "INSERT INTO key_prekeys (user, device, id, key) VALUES (?,?,?,?)",
        [(up.user, up.device, i, k) for i, k in up.prekeys],
    )
    c.executemany(
        "INSERT INTO key_kem_prekeys (user, device, id, key, sig) VALUES (?,?,?,?,?)",
        [(up.user, up.device, i, k, s) for i, k, s in up.kem_prekeys],
    )
    return KeyStock(ec_have + len(ec_ids), kem_have + len(kem_ids), True)


def _take_one(
    c: sqlite3.Connection, table: str, columns: str, user: str, device: int
) -> tuple[Any, ...] | None:
    row = c.execute(
        f"DELETE FROM {table} WHERE user=? AND device=?"
        f" AND id = (SELECT min(id) FROM {table} WHERE user=? AND device=?) RETURNING {columns}",
        (user, device, user, device),
    ).fetchone()
    return None if row is None else tuple(row)


def take_keys(c: sqlite3.Connection, owner: str) -> list[DeviceKeys]:
    _require_user(c, owner)
    devices = c.execute(
        "SELECT device, registration, identity, signed_id, signed_key, signed_sig,"
        " last_id, last_key, last_sig FROM key_devices WHERE user=? ORDER BY device",
        (owner,),
    ).fetchall()
    if not devices:
        raise ProtocolError(ErrorCode.NO_KEYS, f"{owner} has published no keys yet")
    out = []
    for device, registration, identity, s_id, s_key, s_sig, l_id, l_key, l_sig in devices:
        pre = _take_one(c, "key_prekeys", "id, key", owner, device)
        kem = _take_one(c, "key_kem_prekeys", "id, key, sig", owner, device)
        out.append(
            DeviceKeys(
                device,
                registration,
                bytes(identity),
                (s_id, bytes(s_key), bytes(s_sig)),
                None if pre is None else (int(pre[0]), bytes(pre[1])),
                (l_id, bytes(l_key), bytes(l_sig))
                if kem is None
                else (int(kem[0]), bytes(kem[1]), bytes(kem[2])),
                kem is None,
                _count(c, "key_prekeys", owner, device),
                _count(c, "key_kem_prekeys", owner, device),
            )
        )
    return out


def key_stock(c: sqlite3.Connection, user: str, device: int) -> KeyStock:
    row = c.execute("SELECT 1 FROM key_devices WHERE user=? AND device=?", (user, device)).fetchone()
    if row is None:
        return KeyStock(0, 0, False)
    return KeyStock(_count(c, "key_prekeys", user, device), _count(c, "key_kem_prekeys", user, device), True)


def delete_keys(c: sqlite3.Connection, user: str, device: int | None = None) -> None:
    """Every key of ``user``'s ``device`` (None: of all its devices)."""
    where, args = ("user=?", (user,)) if device is None else ("user=? AND device=?", (user, device))
    for table in ("key_devices", "key_prekeys", "key_kem_prekeys"):
        c.execute(f"DELETE FROM {table} WHERE {where}", args)
