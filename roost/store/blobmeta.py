"""Blob metadata (media uploads), for both stores.

The bytes live in a blob store (roost/media); the database keeps who uploaded
what, how big it is, whether it is complete and until when a download URL
handed out is valid, so that quotas hold across gateways and the sweeper
deletes only what nobody may still be fetching.

Each store gets the table in one self-contained schema step
(``SQLITE_STEP`` / ``POSTGRES_STEP``), so the step can be renumbered when
other schema changes land beside it.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from roost.protocol.errors import ErrorCode, ProtocolError

PENDING = "pending"
COMPLETE = "complete"
# Claimed by a sweeper: no download URL is handed out any more, the bytes go,
# then the row. A claim is atomic against ``fetching`` in the database.
DELETING = "deleting"


@dataclass(slots=True, frozen=True)
class BlobRecord:
    blob: str  # 128 random bits in hex
    owner: str
    kind: str
    size: int
    part_size: int
    state: str  # PENDING | COMPLETE | DELETING
    created: int  # ms
    upload_id: str = ""  # the S3 multipart upload's id ("" on the local store)
    completed: int | None = None  # ms
    fetch_until: int = 0  # ms: the last download URL handed out is valid until then

    @property
    def parts(self) -> int:
        return max(1, -(-self.size // self.part_size))

    def part_length(self, part: int) -> int:
        """The exact size of part ``part`` (1-based): ``part_size`` but the last."""
        if part < self.parts:
            return self.part_size
        return self.size - (self.parts - 1) * self.part_size


_COLUMNS = "id, owner, kind, size, part_size, state, created, upload_id, completed, fetch_until"


def record(row: Any) -> BlobRecord:
    return BlobRecord(
        blob=row[0],
        owner=row[1],
        kind=row[2],
        size=row[3],
        part_size=row[4],
        state=row[5],
        created=row[6],
        upload_id=row[7],
        completed=row[8],
        fetch_until=row[9],
    )


def quota_error(used: int, size: int, quota: int) -> ProtocolError:
    return ProtocolError(
        ErrorCode.QUOTA_EXCEEDED,
        f"{size} more bytes would pass the quota of {quota} bytes ({used} stored)",
    )


# -- SQLite (schema step 5) --------------------------------------------------------------

SQLITE_STEP = 5
SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    kind TEXT NOT NULL,
    size INTEGER NOT NULL,
    part_size INTEGER NOT NULL,
    state TEXT NOT NULL,                   -- 'pending' | 'complete'
    created INTEGER NOT NULL,              -- ms
    upload_id TEXT NOT NULL DEFAULT '',
    completed INTEGER,                     -- ms
    fetch_until INTEGER NOT NULL DEFAULT 0 -- ms
);
CREATE INDEX IF NOT EXISTS blobs_by_owner ON blobs (owner);
CREATE INDEX IF NOT EXISTS blobs_by_state ON blobs (state, created);
"""


def sqlite_migrate(conn: sqlite3.Connection) -> None:
    """Schema step 5: the blobs table (idempotent)."""
    conn.executescript(SQLITE_SCHEMA)


def sqlite_create(conn: sqlite3.Connection, rec: BlobRecord, quota: int) -> None:
    """Insert ``rec`` unless the owner's blobs would pass ``quota`` bytes (0: no quota).
    Runs on the writer thread, so the check and the insert are one step."""
    if quota > 0:
        used = conn.execute("SELECT COALESCE(SUM(size), 0) FROM blobs WHERE owner = ?", (rec.owner,))
        total = used.fetchone()[0]
        if total + rec.size > quota:
            raise quota_error(total, rec.size, quota)
    conn.execute(
        f"INSERT INTO blobs ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            rec.blob,
            rec.owner,
            rec.kind,
            rec.size,
            rec.part_size,
            rec.state,
            rec.created,
            rec.upload_id,
            rec.completed,
            rec.fetch_until,
        ),
    )


def sqlite_get(conn: sqlite3.Connection, blob: str) -> BlobRecord | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM blobs WHERE id = ?", (blob,)).fetchone()
    return None if row is None else record(row)


def sqlite_complete(conn: sqlite3.Connection, blob: str, now: int) -> None:
    conn.execute(
        "UPDATE blobs SET state = 'complete', completed = ? WHERE id = ? AND state = 'pending'", (now, blob)
    )


def sqlite_fetching(conn: sqlite3.Connection, blob: str, until: int) -> bool:
    """Note a download URL valid until ``until``; False if the blob is not (or no longer) complete."""
    cur = conn.execute(
        "UPDATE blobs SET fetch_until = MAX(fetch_until, ?) WHERE id = ? AND state = 'complete'",
        (until, blob),
    )
    return cur.rowcount > 0


def sqlite_due(
    conn: sqlite3.Connection, now: int, pending_before: int, complete_before: int, limit: int
) -> list[BlobRecord]:
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM blobs"
        " WHERE fetch_until < ? AND ((state = 'pending' AND created < ?)"
        " OR (state = 'complete' AND completed < ?) OR state = 'deleting')"
        " ORDER BY created LIMIT ?",
        (now, pending_before, complete_before, limit),
    ).fetchall()
    return [record(row) for row in rows]


def sqlite_claim(conn: sqlite3.Connection, blob: str, now: int) -> str | None:
    """Claim a blob for deletion unless a download URL handed out is still
    valid; returns the state it had (None: not claimed)."""
    row = conn.execute("SELECT state, fetch_until FROM blobs WHERE id = ?", (blob,)).fetchone()
    if row is None or row[1] >= now:
        return None
    conn.execute("UPDATE blobs SET state = 'deleting' WHERE id = ?", (blob,))
    return str(row[0])


def sqlite_unclaim(conn: sqlite3.Connection, blob: str, state: str) -> None:
    conn.execute("UPDATE blobs SET state = ? WHERE id = ? AND state = 'deleting'", (state, blob))


def sqlite_delete(conn: sqlite3.Connection, blob: str) -> None:
    conn.execute("DELETE FROM blobs WHERE id = ? AND state = 'deleting'", (blob,))


# -- PostgreSQL (schema step 7) ----------------------------------------------------------

POSTGRES_STEP = 7
POSTGRES_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    id text COLLATE "C" PRIMARY KEY,
    owner text COLLATE "C" NOT NULL,
    kind text NOT NULL,
    size bigint NOT NULL,
    part_size bigint NOT NULL,
    state text NOT NULL,
    created bigint NOT NULL,
    upload_id text NOT NULL DEFAULT '',
    completed bigint,
    fetch_until bigint NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS blobs_by_owner ON blobs (owner);
CREATE INDEX IF NOT EXISTS blobs_by_state ON blobs (state, created);
"""

PG_LOCK_OWNER = "SELECT pg_advisory_xact_lock(hashtext('roost-blobs:' || $1))"
PG_USED = "SELECT COALESCE(SUM(size), 0) FROM blobs WHERE owner = $1"
PG_INSERT = f"INSERT INTO blobs ({_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
PG_GET = f"SELECT {_COLUMNS} FROM blobs WHERE id = $1"
PG_COMPLETE = "UPDATE blobs SET state = 'complete', completed = $2 WHERE id = $1 AND state = 'pending'"
PG_FETCHING = "UPDATE blobs SET fetch_until = GREATEST(fetch_until, $2) WHERE id = $1 AND state = 'complete'"
PG_DUE = (
    f"SELECT {_COLUMNS} FROM blobs WHERE fetch_until < $1"
    " AND ((state = 'pending' AND created < $2) OR (state = 'complete' AND completed < $3)"
    " OR state = 'deleting')"
    " ORDER BY created LIMIT $4"
)
# The old state of the claimed row (FOR UPDATE: atomic against PG_FETCHING).
PG_CLAIM = (
    "UPDATE blobs b SET state = 'deleting' FROM (SELECT id, state FROM blobs WHERE id = $1 FOR UPDATE) old"
    " WHERE b.id = old.id AND b.fetch_until < $2 RETURNING old.state"
)
PG_UNCLAIM = "UPDATE blobs SET state = $2 WHERE id = $1 AND state = 'deleting'"
PG_DELETE = "DELETE FROM blobs WHERE id = $1 AND state = 'deleting'"


def insert_args(rec: BlobRecord) -> tuple[Any, ...]:
    return (
        rec.blob,
        rec.owner,
        rec.kind,
        rec.size,
        rec.part_size,
        rec.state,
        rec.created,
        rec.upload_id,
        rec.completed,
        rec.fetch_until,
    )
