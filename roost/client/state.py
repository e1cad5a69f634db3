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
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

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
-- `roost chat`: group names it learnt (membership events are not in messages).
CREATE TABLE IF NOT EXISTS chat_groups (
    conv TEXT PRIMARY KEY,
    name TEXT NOT NULL
);
"""
# After the migration below, so an old state file has the column first.
INDEXES = "CREATE INDEX IF NOT EXISTS messages_unconsumed ON messages (conv, seq) WHERE consumed = 0;"

CHAT_CURRENT_KEY = "chat_current"  # meta: the chat `roost chat` had open


@dataclass(slots=True, frozen=True)
class OutboxItem:
    id: str
    to: str | None
    conv: str | None
    ct: str
    body: bytes
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


class ClientState:
    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self._lock_fd: int | None = None
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = _lock(self.path)
        self.db = sqlite3.connect(self.path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        # A process crash loses nothing with WAL at NORMAL; only power loss
        # could drop the last commits, which a phone-side client accepts.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self._migrate()
        self.db.executescript(INDEXES)
        self._in_tx = False

    def _migrate(self) -> None:
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(messages)")}
        if "consumed" not in columns:
            # Messages of an older state were all shown already (or lost to
            # the old behaviour); they count as consumed.
            self.db.execute("ALTER TABLE messages ADD COLUMN consumed INTEGER NOT NULL DEFAULT 1")
        # `roost chat` once kept its own unread marks here (the highest seq
        # shown per chat); unread is now what is unconsumed, which the chat
        # marks as it shows a message, so the table says nothing more.
        self.db.execute("DROP TABLE IF EXISTS chat_seen")

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

    def outbox_add(self, item: OutboxItem) -> None:
        self._begin()
        self.db.execute(
            "INSERT OR IGNORE INTO outbox (id, to_user, conv, ct, body, created) VALUES (?,?,?,?,?,?)",
            (item.id, item.to, item.conv, item.ct, item.body, item.created),
        )
        self.commit()

    def outbox(self) -> list[OutboxItem]:
        rows = self.db.execute(
            "SELECT id, to_user, conv, ct, body, created FROM outbox ORDER BY n"
        ).fetchall()
        return [OutboxItem(i, t, c, ct, bytes(b), cr) for i, t, c, ct, b, cr in rows]

    def outbox_remove(self, message_id: str) -> None:
        self._begin()
        self.db.execute("DELETE FROM outbox WHERE id=?", (message_id,))

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
    ) -> None:
        """Store a message once; a received one (``consumed=False``) waits to be shown."""
        self._begin()
        self.db.execute(
            "INSERT OR IGNORE INTO messages (conv, seq, id, sender, ct, body, ts, consumed)"
            " VALUES (?,?,?,?,?,?,?,?)",
            (conv, seq, message_id, sender, ct, body, ts, int(consumed)),
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
    ) -> list[tuple[int, str, str, str, bytes, int]]:
        """The newest ``limit`` stored messages of ``conv`` (older than seq
        ``before`` if given), oldest first: a page to show, paged back by
        passing the oldest seq of the previous page."""
        rows = self.db.execute(
            "SELECT seq, id, sender, ct, body, ts FROM messages WHERE conv=? AND seq < ?"
            " ORDER BY seq DESC LIMIT ?",
            (conv, before if before is not None else 2**62, limit),
        ).fetchall()
        rows.reverse()
        return [(s, i, snd, ct, bytes(b), ts) for s, i, snd, ct, b, ts in rows]

    # shown to the user ----------------------------------------------------------

    def unconsumed(
        self, conv: str | None = None, limit: int | None = None
    ) -> list[tuple[str, int, str, str, str, bytes, int]]:
        """Received messages not yet shown to the user, oldest first (in
        arrival order; within a conversation that is seq order).

        Rows are ``(conv, seq, id, sender, ct, body, ts)``; ``conv`` limits it
        to one conversation. ``len(unconsumed(conv))`` is that chat's unread count.
        """
        where, params = ("consumed = 0", ()) if conv is None else ("consumed = 0 AND conv = ?", (conv,))
        sql = f"SELECT conv, seq, id, sender, ct, body, ts FROM messages WHERE {where} ORDER BY rowid"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        rows = self.db.execute(sql, params).fetchall()
        return [(c, s, i, snd, ct, bytes(b), ts) for c, s, i, snd, ct, b, ts in rows]

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
