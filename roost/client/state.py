"""The SDK's local, durable state (SQLite): outbox, per-conversation cursor,
local message history, and which received messages the user has seen.

A message handed to ``Client.send`` is committed to the outbox before the
call returns, so it survives a crash of the client process and is resent,
with the same id, the next time a client opens this state. Received messages
are committed (with the conversation's ``have`` cursor) before the
application sees them and before the server is told they were delivered.

A received message is stored *unconsumed*: it reached the device but no one
has shown it to the user yet (``roost send`` receives and acks whatever is
pending, but prints only its own result). Whoever shows it to the user marks
it consumed (``mark_consumed``): ``roost listen`` prints the unconsumed ones
first, ``roost chat`` counts them as unread. The user's own sent messages are
stored consumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, overload

try:
    import fcntl
except ImportError:  # Windows: no advisory lock, one client per state is up to the caller
    fcntl = None  # type: ignore[assignment]

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    n INTEGER PRIMARY KEY AUTOINCREMENT,   -- send order
    id TEXT NOT NULL UNIQUE,
    to_user TEXT,
    conv TEXT,
    ct TEXT NOT NULL,
    body BLOB NOT NULL,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS convs (
    conv TEXT PRIMARY KEY,
    have INTEGER NOT NULL DEFAULT 0
);
-- Receipt marks learnt for our own messages, so ticks survive a restart.
CREATE TABLE IF NOT EXISTS receipts (
    conv TEXT PRIMARY KEY,
    all_delivered INTEGER NOT NULL,
    all_read INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    conv TEXT NOT NULL,
    seq INTEGER NOT NULL,
    id TEXT NOT NULL,
    sender TEXT NOT NULL,
    ct TEXT NOT NULL,
    body BLOB NOT NULL,
    ts INTEGER NOT NULL,
    consumed INTEGER NOT NULL DEFAULT 1,   -- 0: received, not yet shown to the user
    PRIMARY KEY (conv, seq)
);
-- File sends waiting for their blob (Client.send_file): the encrypted file
-- is uploaded, then the message moves to the outbox in one transaction.
CREATE TABLE IF NOT EXISTS uploads (
    n INTEGER PRIMARY KEY AUTOINCREMENT,   -- send order
    id TEXT NOT NULL UNIQUE,               -- the id its message is sent with
    to_user TEXT,
    conv TEXT,
    source TEXT NOT NULL,                  -- the file as given
    temp TEXT NOT NULL,                    -- its encrypted blob, in the state's media dir
    kind TEXT NOT NULL,
    size INTEGER NOT NULL,                 -- of the blob
    ref BLOB NOT NULL,                     -- the reference, its blob id still empty
    blob TEXT,                             -- the server's id, once it gave a slot
    uploaded INTEGER NOT NULL DEFAULT 0,   -- bytes the server had at the last progress report
    created INTEGER NOT NULL
);
-- When this device heard each member's receipt mark for our own messages
-- advance (ms, this device's clock): a row per advance, so a message's
-- delivered / read time per member is the first row whose seq reaches it.
-- The protocol's marks carry no times; the server pushes each change at
-- once to a connected sender, so for an online device this is when it happened.
CREATE TABLE IF NOT EXISTS receipt_marks (
    conv TEXT NOT NULL,
    user TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('delivered', 'read')),
    seq INTEGER NOT NULL,                  -- the member's mark from then on
    at INTEGER NOT NULL,
    PRIMARY KEY (conv, user, kind, seq)
);
-- `roost chat`: group names it learnt (membership events are not in messages).
CREATE TABLE IF NOT EXISTS chat_groups (
    conv TEXT PRIMARY KEY,
    name TEXT NOT NULL
);
"""
# End-to-end encryption (roost.client.crypto). Private keys, sessions and
# sender keys live here and nowhere else: the file is created 0600.
E2EE_SCHEMA = """
CREATE TABLE IF NOT EXISTS e2ee_local (
    k INTEGER PRIMARY KEY CHECK (k = 1),
    keys BLOB NOT NULL                     -- LocalKeys.to_bytes()
);
CREATE TABLE IF NOT EXISTS e2ee_sessions (
    user TEXT NOT NULL,
    device INTEGER NOT NULL,
    session BLOB NOT NULL,                 -- msgpack list of Session.to_bytes(): current first
    PRIMARY KEY (user, device)
);
-- Peers' identity keys as first seen (trust on first use), for key-change
-- warnings; verified: the user compared safety numbers; changed: a new key
-- replaced the one seen before (cleared when the user verifies the new one).
CREATE TABLE IF NOT EXISTS e2ee_identities (
    user TEXT PRIMARY KEY,
    identity BLOB NOT NULL,
    verified INTEGER NOT NULL DEFAULT 0,
    changed INTEGER NOT NULL DEFAULT 0,
    seen INTEGER NOT NULL
);
-- This device's sending sender key per group, and who was given it.
CREATE TABLE IF NOT EXISTS e2ee_own_sender_keys (
    conv TEXT PRIMARY KEY,
    record BLOB NOT NULL,
    skdm BLOB NOT NULL,
    members TEXT NOT NULL                  -- JSON list: members sent the distribution message
);
-- Other members' sender keys, per distribution id (an old one still opens
-- messages sent before the sender rotated).
CREATE TABLE IF NOT EXISTS e2ee_sender_keys (
    conv TEXT NOT NULL,
    sender TEXT NOT NULL,
    dist TEXT NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (conv, sender, dist)
);
-- Received ciphertexts not decrypted (yet): a group message before its
-- sender key, or one that failed (a retry request went to the sender).
CREATE TABLE IF NOT EXISTS e2ee_held (
    conv TEXT NOT NULL,
    seq INTEGER NOT NULL,
    id TEXT NOT NULL,
    sender TEXT NOT NULL,
    body BLOB NOT NULL,
    ts INTEGER NOT NULL,
    reason TEXT NOT NULL,                  -- no_sender_key | failed | behind | gave_up
    retried INTEGER NOT NULL DEFAULT 0,    -- when (ms) a retry request was queued; 0 never
    PRIMARY KEY (conv, seq)
);
"""
# Outbox columns added for encryption (migrated onto older state files).
OUTBOX_E2EE_COLUMNS = {
    "wire_ct": "TEXT",  # what goes on the wire once encrypted (NULL while waiting)
    "wire_body": "BLOB",
    "pending": "TEXT",  # why it waits (no keys yet, ...), NULL otherwise
    "control": "INTEGER NOT NULL DEFAULT 0",  # 1: protocol message, never shown or kept in history
}

# After the migration below, so an old state file has the column first.
INDEXES = "CREATE INDEX IF NOT EXISTS messages_unconsumed ON messages (conv, seq) WHERE consumed = 0;"

CHAT_CURRENT_KEY = "chat_current"  # meta: the chat `roost chat` had open


@dataclass(slots=True, frozen=True)
class OutboxItem:
    """A message to send. ``ct``/``body`` are the plaintext (the local copy);
    ``wire_ct``/``wire_body`` what the server gets, set once when it is
    encrypted, so a resend sends the same bytes; None while it waits
    (``pending`` says why)."""

    id: str
    to: str | None
    conv: str | None
    ct: str
    body: bytes
    created: int
    wire_ct: str | None = None
    wire_body: bytes | None = None
    pending: str | None = None
    control: bool = False

    @property
    def ready(self) -> bool:
        return self.wire_body is not None


class Outbox(dict[str, OutboxItem]):
    """The client's outbox in memory (id -> item, in send order) that also
    counts, per chat, the items not sealed yet: whether a new message must
    wait behind an older one to the same chat is then one lookup, not a scan
    of the outbox (a sender key handed to 1,023 members queued 1,023 items,
    and each one scanned all the others: a third of the sender's CPU)."""

    __slots__ = ("_unsealed",)

    def __init__(self, items: Iterable[OutboxItem] = ()) -> None:
        super().__init__()
        self._unsealed: Counter[tuple[str | None, str | None]] = Counter()
        for item in items:
            self[item.id] = item

    def __setitem__(self, key: str, item: OutboxItem) -> None:
        self._forget(super().get(key))
        super().__setitem__(key, item)
        if not item.ready:
            self._unsealed[(item.to, item.conv)] += 1

    def __delitem__(self, key: str) -> None:
        self._forget(super().get(key))
        super().__delitem__(key)

    @overload  # type: ignore[override]
    def pop(self, key: str, /) -> OutboxItem: ...
    @overload
    def pop(self, key: str, default: None, /) -> OutboxItem | None: ...
    def pop(self, key: str, *default: None) -> OutboxItem | None:
        self._forget(super().get(key))
        return super().pop(key, *default)

    def clear(self) -> None:
        self._unsealed.clear()
        super().clear()

    def _unsupported(self, *_args: object, **_kwargs: object) -> NoReturn:
        # dict's bulk methods would bypass the count above.
        raise TypeError("Outbox keeps a count: set, pop or del items one at a time")

    update = setdefault = popitem = __ior__ = _unsupported

    def waiting(self, to: str | None, conv: str | None) -> bool:
        """Some item to this chat is not sealed yet."""
        return self._unsealed[(to, conv)] > 0

    def _forget(self, item: OutboxItem | None) -> None:
        if item is not None and not item.ready:
            chat = (item.to, item.conv)
            self._unsealed[chat] -= 1
            if self._unsealed[chat] <= 0:
                del self._unsealed[chat]


@dataclass(slots=True, frozen=True)
class UploadItem:
    """A file send whose blob is not complete yet (see ``Client.send_file``)."""

    id: str
    to: str | None
    conv: str | None
    source: str
    temp: str
    kind: str
    size: int
    ref: bytes
    blob: str | None
    uploaded: int
    created: int


@dataclass(slots=True, frozen=True)
class ChatSummary:
    """One conversation as the chat list shows it: its newest stored message
    and how many received messages in it are unconsumed (unread)."""

    conv: str
    seq: int
    sender: str
    ct: str
    body: bytes
    ts: int
    unread: int


def default_state_path(token: str) -> Path:
    """One state file per account, under ``$XDG_STATE_HOME/roost`` (or ~/.local/state)."""
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    digest = hashlib.sha256(token.encode()).hexdigest()[:16]
    return base / "roost" / f"{digest}.sqlite"


class StateInUse(RuntimeError):
    """Another running client holds this state file."""


def _lock(path: str) -> int | None:
    """An exclusive lock on ``path``.lock, held until closed (or the process dies).

    Two clients on one state would both resend one outbox and write one
    local history, and the later connection would close the earlier (4003).
    """
    if fcntl is None:
        return None
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StateInUse(
            f"the client state {path} is in use by another running client (pid {holder})"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


def _private(path: str) -> None:
    """The state holds the device's private keys: owner-only, created so."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)


class ClientState:
    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self._lock_fd: int | None = None
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = _lock(self.path)
            _private(self.path)
        self.db = sqlite3.connect(self.path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        # A process crash loses nothing with WAL at NORMAL; only power loss
        # could drop the last commits, which a phone-side client accepts.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA + E2EE_SCHEMA)
        self._migrate()
        self.db.executescript(INDEXES)
        self._in_tx = False
        if self.path != ":memory:":
            for suffix in ("-wal", "-shm"):
                if os.path.exists(self.path + suffix):
                    os.chmod(self.path + suffix, 0o600)

    def _migrate(self) -> None:
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(messages)")}
        if "encrypted" not in columns:
            self.db.execute("ALTER TABLE messages ADD COLUMN encrypted INTEGER NOT NULL DEFAULT 0")
        if "consumed" not in columns:
            # Messages of an older state were all shown already (or lost to
            # the old behaviour); they count as consumed.
            self.db.execute("ALTER TABLE messages ADD COLUMN consumed INTEGER NOT NULL DEFAULT 1")
        # `roost chat` once kept its own unread marks here (the highest seq
        # shown per chat); unread is now what is unconsumed, which the chat
        # marks as it shows a message, so the table says nothing more.
        self.db.execute("DROP TABLE IF EXISTS chat_seen")
        outbox_columns = {row[1] for row in self.db.execute("PRAGMA table_info(outbox)")}
        for name, decl in OUTBOX_E2EE_COLUMNS.items():
            if name not in outbox_columns:
                self.db.execute(f"ALTER TABLE outbox ADD COLUMN {name} {decl}")

    def close(self) -> None:
        self.commit()
        self.db.close()
        self.release_lock()

    def release_lock(self) -> None:
        """Let another client open this state (closing does it; so does the
        death of the process, which the simulator imitates with this)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _begin(self) -> None:
        if not self._in_tx:
            self.db.execute("BEGIN")
            self._in_tx = True

    def commit(self) -> None:
        if self._in_tx:
            self.db.execute("COMMIT")
            self._in_tx = False

    # outbox ----------------------------------------------------------------

    def outbox_add(self, item: OutboxItem, *, commit: bool = True) -> None:
        """Queue ``item``; ``commit=False`` leaves it in the open transaction
        (with the session state that encrypted it, say)."""
        self._begin()
        self.db.execute(
            "INSERT OR IGNORE INTO outbox (id, to_user, conv, ct, body, created, wire_ct, wire_body,"
            " pending, control) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (
                item.id,
                item.to,
                item.conv,
                item.ct,
                item.body,
                item.created,
                item.wire_ct,
                item.wire_body,
                item.pending,
                int(item.control),
            ),
        )
        if commit:
            self.commit()

    def outbox_set_wire(self, message_id: str, wire_ct: str, wire_body: bytes) -> None:
        """The item's ciphertext, in the open transaction (committed with the
        session or sender-key state that produced it)."""
        self._begin()
        self.db.execute(
            "UPDATE outbox SET wire_ct=?, wire_body=?, pending=NULL WHERE id=?",
            (wire_ct, wire_body, message_id),
        )

    def outbox_set_pending(self, message_id: str, reason: str | None) -> None:
        self._begin()
        self.db.execute("UPDATE outbox SET pending=? WHERE id=?", (reason, message_id))
        self.commit()

    def outbox(self) -> list[OutboxItem]:
        rows = self.db.execute(
            "SELECT id, to_user, conv, ct, body, created, wire_ct, wire_body, pending, control"
            " FROM outbox ORDER BY n"
        ).fetchall()
        return [
            OutboxItem(i, t, c, ct, bytes(b), cr, wct, None if wb is None else bytes(wb), p, bool(ctl))
            for i, t, c, ct, b, cr, wct, wb, p, ctl in rows
        ]

    def outbox_remove(self, message_id: str) -> None:
        self._begin()
        self.db.execute("DELETE FROM outbox WHERE id=?", (message_id,))

    # file sends waiting for their blob ------------------------------------------

    def upload_add(self, item: UploadItem) -> None:
        self._begin()
        self.db.execute(
            "INSERT OR IGNORE INTO uploads (id, to_user, conv, source, temp, kind, size, ref, blob,"
            " uploaded, created) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                item.id,
                item.to,
                item.conv,
                item.source,
                item.temp,
                item.kind,
                item.size,
                item.ref,
                item.blob,
                item.uploaded,
                item.created,
            ),
        )
        self.commit()

    def uploads(self) -> list[UploadItem]:
        rows = self.db.execute(
            "SELECT id, to_user, conv, source, temp, kind, size, ref, blob, uploaded, created"
            " FROM uploads ORDER BY n"
        ).fetchall()
        return [
            UploadItem(i, to, conv, src, temp, kind, size, bytes(ref), blob, done, created)
            for i, to, conv, src, temp, kind, size, ref, blob, done, created in rows
        ]

    def upload_set_blob(self, message_id: str, blob: str | None) -> None:
        """Committed before a byte is uploaded, so a restarted client resumes this blob."""
        self._begin()
        self.db.execute("UPDATE uploads SET blob=?, uploaded=0 WHERE id=?", (blob, message_id))
        self.commit()

    def upload_progress(self, message_id: str, uploaded: int) -> None:
        self._begin()
        self.db.execute("UPDATE uploads SET uploaded=? WHERE id=?", (uploaded, message_id))
        self.commit()

    def upload_remove(self, message_id: str, *, commit: bool = True) -> None:
        """``commit=False``: in the open transaction, which the upload's message
        joins when its blob is complete (``Client._queue_finished_upload``), so
        it is queued exactly once whenever the client stops."""
        self._begin()
        self.db.execute("DELETE FROM uploads WHERE id=?", (message_id,))
        if commit:
            self.commit()

    # end-to-end encryption: every write joins the open transaction; the
    # caller commits it together with the message it concerns.

    def e2ee_local_keys(self) -> bytes | None:
        row = self.db.execute("SELECT keys FROM e2ee_local WHERE k=1").fetchone()
        return None if row is None else bytes(row[0])

    def save_e2ee_local_keys(self, keys: bytes) -> None:
        self._begin()
        self.db.execute(
            "INSERT INTO e2ee_local (k, keys) VALUES (1, ?) ON CONFLICT (k) DO UPDATE SET keys=excluded.keys",
            (keys,),
        )

    def session(self, user: str, device: int) -> bytes | None:
        row = self.db.execute(
            "SELECT session FROM e2ee_sessions WHERE user=? AND device=?", (user, device)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def save_session(self, user: str, device: int, session: bytes) -> None:
        self._begin()
        self.db.execute(
            "INSERT INTO e2ee_sessions (user, device, session) VALUES (?,?,?)"
            " ON CONFLICT (user, device) DO UPDATE SET session=excluded.session",
            (user, device, session),
        )

    def drop_sessions(self, user: str) -> None:
        self._begin()
        self.db.execute("DELETE FROM e2ee_sessions WHERE user=?", (user,))

    def identity(self, user: str) -> tuple[bytes, bool, bool] | None:
        """(identity key, verified, changed) as last seen for ``user``."""
        row = self.db.execute(
            "SELECT identity, verified, changed FROM e2ee_identities WHERE user=?", (user,)
        ).fetchone()
        return None if row is None else (bytes(row[0]), bool(row[1]), bool(row[2]))

    def save_identity(self, user: str, identity: bytes, *, changed: bool, now: int) -> None:
        """A (new) identity key for ``user``: not verified any more."""
        self._begin()
        self.db.execute(
            "INSERT INTO e2ee_identities (user, identity, verified, changed, seen) VALUES (?,?,0,?,?)"
            " ON CONFLICT (user) DO UPDATE SET identity=excluded.identity, verified=0,"
            " changed=excluded.changed, seen=excluded.seen",
            (user, identity, int(changed), now),
        )

    def set_identity_verified(self, user: str, verified: bool) -> None:
        self._begin()
        self.db.execute(
            "UPDATE e2ee_identities SET verified=?, changed=0 WHERE user=?", (int(verified), user)
        )
        self.commit()

    def own_sender_key(self, conv: str) -> tuple[bytes, bytes, list[str]] | None:
        row = self.db.execute(
            "SELECT record, skdm, members FROM e2ee_own_sender_keys WHERE conv=?", (conv,)
        ).fetchone()
        if row is None:
            return None
        return bytes(row[0]), bytes(row[1]), list(json.loads(row[2]))

    def save_own_sender_key(self, conv: str, record: bytes, skdm: bytes, members: list[str]) -> None:
        self._begin()
        self.db.execute(
            "INSERT INTO e2ee_own_sender_keys (conv, record, skdm, members) VALUES (?,?,?,?)"
            " ON CONFLICT (conv) DO UPDATE SET record=excluded.record, skdm=excluded.skdm,"
            " members=excluded.members",
            (conv, record, skdm, json.dumps(sorted(members))),
        )

    def drop_own_sender_key(self, conv: str) -> None:
        self._begin()
        self.db.execute("DELETE FROM e2ee_own_sender_keys WHERE conv=?", (conv,))

    def sender_key(self, conv: str, sender: str, dist: str) -> bytes | None:
        row = self.db.execute(
            "SELECT record FROM e2ee_sender_keys WHERE conv=? AND sender=? AND dist=?", (conv, sender, dist)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def save_sender_key(self, conv: str, sender: str, dist: str, record: bytes) -> None:
        self._begin()
        self.db.execute(
            "INSERT INTO e2ee_sender_keys (conv, sender, dist, record) VALUES (?,?,?,?)"
            " ON CONFLICT (conv, sender, dist) DO UPDATE SET record=excluded.record",
            (conv, sender, dist, record),
        )

    def hold(
        self, conv: str, seq: int, message_id: str, sender: str, body: bytes, ts: int, reason: str
    ) -> None:
        self._begin()
        self.db.execute(
            "INSERT OR IGNORE INTO e2ee_held (conv, seq, id, sender, body, ts, reason)"
            " VALUES (?,?,?,?,?,?,?)",
            (conv, seq, message_id, sender, body, ts, reason),
        )

    def held(
        self, conv: str | None = None, sender: str | None = None
    ) -> list[tuple[str, int, str, str, bytes, int, str, int]]:
        """Held ciphertexts ``(conv, seq, id, sender, body, ts, reason, retried)`` in seq order."""
        where, params = "1=1", []
        if conv is not None:
            where += " AND conv=?"
            params.append(conv)
        if sender is not None:
            where += " AND sender=?"
            params.append(sender)
        rows = self.db.execute(
            f"SELECT conv, seq, id, sender, body, ts, reason, retried FROM e2ee_held WHERE {where}"
            " ORDER BY conv, seq",
            params,
        ).fetchall()
        return [(c, s, i, snd, bytes(b), ts, r, rt) for c, s, i, snd, b, ts, r, rt in rows]

    def held_by_id(self, conv: str, message_id: str, sender: str) -> tuple[int, int, str] | None:
        """(seq, ts, reason) of the held message ``message_id`` from ``sender`` in ``conv``."""
        row = self.db.execute(
            "SELECT seq, ts, reason FROM e2ee_held WHERE conv=? AND id=? AND sender=?",
            (conv, message_id, sender),
        ).fetchone()
        return None if row is None else (int(row[0]), int(row[1]), str(row[2]))

    def held_blocking(self, conv: str) -> bool:
        """True while a message of ``conv`` waits to be readable (its later ones wait behind it)."""
        row = self.db.execute(
            "SELECT 1 FROM e2ee_held WHERE conv=? AND reason IN ('no_sender_key', 'failed') LIMIT 1", (conv,)
        ).fetchone()
        return row is not None

    def set_held_reason(self, conv: str, seq: int, reason: str) -> None:
        self._begin()
        self.db.execute("UPDATE e2ee_held SET reason=? WHERE conv=? AND seq=?", (reason, conv, seq))

    def mark_held_retried(self, conv: str, seq: int, now: int) -> None:
        self._begin()
        self.db.execute("UPDATE e2ee_held SET retried=? WHERE conv=? AND seq=?", (now, conv, seq))

    def unhold(self, conv: str, seq: int) -> None:
        self._begin()
        self.db.execute("DELETE FROM e2ee_held WHERE conv=? AND seq=?", (conv, seq))

    def sent_copy(self, conv: str, message_id: str, sender: str) -> tuple[str, bytes] | None:
        """(ct, body) of our own message ``message_id``, as stored at its ✓."""
        row = self.db.execute(
            "SELECT ct, body FROM messages WHERE conv=? AND id=? AND sender=?", (conv, message_id, sender)
        ).fetchone()
        return None if row is None else (str(row[0]), bytes(row[1]))

    def stored_message(self, conv: str, seq: int) -> tuple[str, str, str, bytes, int] | None:
        """(id, sender, ct, body, ts) of the local copy of ``(conv, seq)``."""
        row = self.db.execute(
            "SELECT id, sender, ct, body, ts FROM messages WHERE conv=? AND seq=?", (conv, seq)
        ).fetchone()
        return None if row is None else (str(row[0]), str(row[1]), str(row[2]), bytes(row[3]), int(row[4]))

    # conversations -----------------------------------------------------------

    def haves(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT conv, have FROM convs").fetchall())

    def save_have(self, conv: str, have: int) -> None:
        self._begin()
        self.db.execute(
            "INSERT INTO convs (conv, have) VALUES (?,?)"
            " ON CONFLICT (conv) DO UPDATE SET have=max(have, excluded.have)",
            (conv, have),
        )

    def store_message(
        self,
        conv: str,
        seq: int,
        message_id: str,
        sender: str,
        ct: str,
        body: bytes,
        ts: int,
        *,
        consumed: bool = False,
        encrypted: bool = False,
    ) -> None:
        """Store a message once; a received one (``consumed=False``) waits to be shown.
        ``encrypted``: it crossed the server end-to-end encrypted."""
        self._begin()
        self.db.execute(
            "INSERT OR IGNORE INTO messages (conv, seq, id, sender, ct, body, ts, consumed, encrypted)"
            " VALUES (?,?,?,?,?,?,?,?,?)",
            (conv, seq, message_id, sender, ct, body, ts, int(consumed), int(encrypted)),
        )

    def receipts(self) -> dict[str, tuple[int, int]]:
        rows = self.db.execute("SELECT conv, all_delivered, all_read FROM receipts").fetchall()
        return {conv: (d, r) for conv, d, r in rows}

    def save_receipt(self, conv: str, all_delivered: int, all_read: int) -> None:
        self._begin()
        self.db.execute(
            "INSERT INTO receipts (conv, all_delivered, all_read) VALUES (?,?,?)"
            " ON CONFLICT (conv) DO UPDATE SET all_delivered=max(all_delivered, excluded.all_delivered),"
            " all_read=max(all_read, excluded.all_read)",
            (conv, all_delivered, all_read),
        )

    def member_marks(self) -> dict[str, dict[str, tuple[int, int]]]:
        """conv -> member -> (delivered seq, read seq), the highest recorded."""
        rows = self.db.execute(
            "SELECT conv, user, kind, MAX(seq) FROM receipt_marks GROUP BY conv, user, kind"
        ).fetchall()
        out: dict[str, dict[str, tuple[int, int]]] = {}
        for conv, user, kind, seq in rows:
            delivered, read = out.setdefault(conv, {}).get(user, (0, 0))
            out[conv][user] = (seq, read) if kind == "delivered" else (delivered, seq)
        return out

    def save_member_mark(self, conv: str, user: str, kind: str, seq: int, at: int) -> None:
        """``user``'s ``kind`` mark in ``conv`` reached ``seq`` at ``at`` (ms); in the open
        transaction. A mark heard again (a replay on connect) keeps its first time."""
        self._begin()
        self.db.execute(
            "INSERT OR IGNORE INTO receipt_marks (conv, user, kind, seq, at) VALUES (?,?,?,?,?)",
            (conv, user, kind, seq, at),
        )

    def receipt_times(self, conv: str, seq: int) -> dict[str, tuple[int | None, int | None]]:
        """member -> (delivered at, read at) in ms for the message ``seq`` of
        ``conv``: when its mark first reached ``seq``; None while it has not.
        Read implies delivered, so a delivered time is never after the read time."""
        rows = self.db.execute(
            "SELECT user, kind, MIN(at) FROM receipt_marks WHERE conv=? AND seq>=? GROUP BY user, kind",
            (conv, seq),
        ).fetchall()
        out: dict[str, tuple[int | None, int | None]] = {}
        for user, kind, at in rows:
            delivered, read = out.get(user, (None, None))
            out[user] = (at, read) if kind == "delivered" else (delivered, at)
        return {
            user: (read if delivered is None or (read is not None and read < delivered) else delivered, read)
            for user, (delivered, read) in out.items()
        }

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        self._begin()
        self.db.execute(
            "INSERT INTO meta (key, value) VALUES (?,?) ON CONFLICT (key) DO UPDATE SET value=excluded.value",
            (key, value),
        )
        self.commit()

    def local_history(
        self, conv: str, limit: int = 50, before: int | None = None
    ) -> list[tuple[int, str, str, str, bytes, int, bool]]:
        """The newest ``limit`` stored messages of ``conv`` (older than seq
        ``before`` if given), oldest first: a page to show, paged back by
        passing the oldest seq of the previous page."""
        rows = self.db.execute(
            "SELECT seq, id, sender, ct, body, ts, encrypted FROM messages WHERE conv=? AND seq < ?"
            " ORDER BY seq DESC LIMIT ?",
            (conv, before if before is not None else 2**62, limit),
        ).fetchall()
        rows.reverse()
        return [(s, i, snd, ct, bytes(b), ts, bool(e)) for s, i, snd, ct, b, ts, e in rows]

    # shown to the user ----------------------------------------------------------

    def unconsumed(
        self, conv: str | None = None, limit: int | None = None
    ) -> list[tuple[str, int, str, str, str, bytes, int, bool]]:
        """Received messages not yet shown to the user, oldest first (in
        arrival order; within a conversation that is seq order).

        Rows are ``(conv, seq, id, sender, ct, body, ts, encrypted)``; ``conv`` limits it
        to one conversation. ``len(unconsumed(conv))`` is that chat's unread count.
        """
        where, params = ("consumed = 0", ()) if conv is None else ("consumed = 0 AND conv = ?", (conv,))
        sql = (
            "SELECT conv, seq, id, sender, ct, body, ts, encrypted FROM messages"
            f" WHERE {where} ORDER BY rowid"
        )
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        rows = self.db.execute(sql, params).fetchall()
        return [(c, s, i, snd, ct, bytes(b), ts, bool(e)) for c, s, i, snd, ct, b, ts, e in rows]

    def unconsumed_counts(self) -> dict[str, int]:
        """conv -> how many received messages in it were not shown yet (unread)."""
        rows = self.db.execute(
            "SELECT conv, count(*) FROM messages WHERE consumed = 0 GROUP BY conv"
        ).fetchall()
        return dict(rows)

    def is_consumed(self, conv: str, seq: int) -> bool:
        """True unless ``(conv, seq)`` is a stored message still waiting to be shown."""
        row = self.db.execute("SELECT consumed FROM messages WHERE conv=? AND seq=?", (conv, seq)).fetchone()
        return row is None or bool(row[0])

    def mark_consumed(self, conv: str, upto_seq: int) -> None:
        """The user has been shown ``conv`` up to ``upto_seq``: committed at once,
        so a later ``roost listen`` does not print those messages again."""
        self._begin()
        self.db.execute(
            "UPDATE messages SET consumed = 1 WHERE conv = ? AND seq <= ? AND consumed = 0",
            (conv, upto_seq),
        )
        self.commit()

    def consume_one(self, conv: str, seq: int) -> None:
        """Just ``(conv, seq)`` was shown (committed at once)."""
        self._begin()
        self.db.execute("UPDATE messages SET consumed = 1 WHERE conv = ? AND seq = ?", (conv, seq))
        self.commit()

    # roost chat: the groups it learnt, so the chat list and names survive a restart

    def chat_groups(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT conv, name FROM chat_groups").fetchall())

    def save_chat_group(self, conv: str, name: str) -> None:
        self._begin()
        self.db.execute(
            "INSERT INTO chat_groups (conv, name) VALUES (?,?)"
            " ON CONFLICT (conv) DO UPDATE SET name=excluded.name",
            (conv, name),
        )
        self.commit()

    def chat_summaries(self) -> list[ChatSummary]:
        """Every conversation with stored messages: the newest one, and how
        many received messages in it were not shown yet (its unread count)."""
        rows = self.db.execute(
            "SELECT m.conv, m.seq, m.sender, m.ct, m.body, m.ts,"
            " (SELECT count(*) FROM messages u WHERE u.conv = m.conv AND u.consumed = 0)"
            " FROM messages m WHERE m.seq = (SELECT max(seq) FROM messages x WHERE x.conv = m.conv)"
        ).fetchall()
        return [ChatSummary(c, q, snd, ct, bytes(b), ts, n) for c, q, snd, ct, b, ts, n in rows]

    def search(self, text: str, limit: int = 50) -> list[tuple[str, int, str, str, str, bytes, int]]:
        """Stored text messages containing ``text`` (ASCII case-insensitive),
        newest first: rows ``(conv, seq, id, sender, ct, body, ts)``. Local
        only: the server cannot read message bodies to search them."""
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = self.db.execute(
            "SELECT conv, seq, id, sender, ct, body, ts FROM messages"
            " WHERE ct LIKE 'text/%' AND CAST(body AS TEXT) LIKE ? ESCAPE '\\'"
            " ORDER BY ts DESC, seq DESC LIMIT ?",
            (pattern, limit),
        ).fetchall()
        return [(c, s, i, snd, ct, bytes(b), ts) for c, s, i, snd, ct, b, ts in rows]
