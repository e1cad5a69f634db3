"""SQLite store for embedded mode: WAL, synchronous=FULL, group commit.

One writer thread owns the only writing connection. Callers enqueue
operations; the thread takes everything queued (up to ``max_batch``), runs it
in one transaction and commits once, so concurrent sends share one fsync:
while one commit is on disk the next batch accumulates. Under concurrent load
(operations queued while a batch ran, or a batch of more than one) the next
commit starts no sooner than ``commit_interval`` after the previous one
began, so a commit's fixed cost is shared by more operations; otherwise an
operation is committed at once. Results go back to the
event loop only after COMMIT returned.

Reads run on a small thread pool with their own connections (WAL lets them
proceed while the writer commits). sqlite3 releases the GIL while a statement
runs, so both overlap with the event loop.

The writer keeps each touched conversation's state (last seq, members and
their marks) in memory. It is the only writer of that state, so the cache is
authoritative; a failed transaction drops the whole cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from roost.core import membership as rules
from roost.core.delivery import DrainRequest
from roost.core.ids import direct_conv_id, direct_members
from roost.core.membership import ADMIN, MEMBER, Member
from roost.core.metrics import Metrics
from roost.protocol.errors import ErrorCode, ProtocolError
from roost.protocol.frames import MEMBERSHIP_CT, SYSTEM_SENDER
from roost.store import blobmeta, sqlite_keys
from roost.store.base import (
    REMOVED,
    Account,
    ConnectState,
    DeviceKeys,
    DrainPage,
    GroupSnapshot,
    InboxEntry,
    KeyStock,
    KeyUpload,
    MarkResult,
    ReceiptState,
    SendStream,
    StoredMessage,
    StoreUnavailable,
    no_connect_state,
    removed_token,
)
from roost.store.pass_batch import PassBatcher

log = logging.getLogger("roost.store")

SCHEMA_VERSION = 5  # 4: the key directory (roost/store/sqlite_keys.py); 5: blobs (roost/store/blobmeta.py)

SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    token_hash BLOB NOT NULL UNIQUE,
    created INTEGER NOT NULL,
    last_seen INTEGER,
    state TEXT NOT NULL DEFAULT 'active'  -- 'active' | 'disabled' | 'removed'
);
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,              -- 'direct' | 'group'
    name TEXT NOT NULL DEFAULT '',
    last_seq INTEGER NOT NULL DEFAULT 0,
    created INTEGER NOT NULL
);
-- One row per (conversation, user): membership and the receipt/inbox marks.
CREATE TABLE IF NOT EXISTS members (
    conv TEXT NOT NULL,
    user TEXT NOT NULL,
    role TEXT NOT NULL,
    joined_seq INTEGER NOT NULL,
    left_seq INTEGER,
    delivered INTEGER NOT NULL,
    read INTEGER NOT NULL,
    PRIMARY KEY (conv, user)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS members_by_user ON members (user, conv);
CREATE TABLE IF NOT EXISTS messages (
    conv TEXT NOT NULL,
    seq INTEGER NOT NULL,
    sender TEXT NOT NULL,
    client_id TEXT NOT NULL,
    ct TEXT NOT NULL,
    body BLOB NOT NULL,
    ts INTEGER NOT NULL,
    PRIMARY KEY (conv, seq)
);
-- Idempotent send: a retried client id maps back to the stored message.
CREATE UNIQUE INDEX IF NOT EXISTS messages_idempotency ON messages (conv, sender, client_id);
-- Receipt changes a sender has not acked yet (delivered again on reconnect):
-- pending while rv > acked. The row stays once acked, so rv never starts
-- again at 1 and a late ack of an old receipt cannot clear a new one.
CREATE TABLE IF NOT EXISTS receipt_pending (
    user TEXT NOT NULL,
    conv TEXT NOT NULL,
    rv INTEGER NOT NULL,
    acked INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user, conv)
) WITHOUT ROWID;
-- The members whose marks changed in those receipts, with the rv of the last
-- change: every live receipt carries them all again until an ack covers that
-- rv, since an ack of a later receipt cannot tell whether an earlier one
-- (that alone carried a mark) arrived.
CREATE TABLE IF NOT EXISTS receipt_marks (
    user TEXT NOT NULL,
    conv TEXT NOT NULL,
    member TEXT NOT NULL,
    rv INTEGER NOT NULL,
    PRIMARY KEY (user, conv, member)
) WITHOUT ROWID;
"""
    + sqlite_keys.KEYS_SCHEMA
)

_MSG_COLUMNS = "conv, seq, sender, client_id, ct, body, ts"

# A receipt ack answers nobody and losing one only re-sends a receipt, so it
# does not start a commit of its own: it rides with the next batch, or is
# committed after at most this long when no other write comes.
LAZY_COMMIT_SECONDS = 0.05

# Every commit costs CPU whatever it carries: the fdatasync, the WAL frames of
# the pages every batch touches (members, receipts, conversations), waking the
# writer and then the event loop. Back-to-back commits of a few operations
# each spent a fifth of the gateway's core at 5,000 msg/s (docs/performance.md,
# "Change 2: commit pacing"); spacing commits under load by this much shares that cost
# among more messages for at most this much extra latency.
COMMIT_INTERVAL_SECONDS = 0.003

# Logins of one loop pass share one reader-thread hop (roost/store/pass_batch.py):
# at most this many token lookups / connect-time reads per hop.
TOKEN_BATCH = 512
CONNECT_BATCH = 256
_WAKE = object()  # queued by the lazy timer: run a batch even if only lazy ops wait


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk before we ack. NORMAL could lose acked messages
    # on power loss.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=10000")
    conn.execute("PRAGMA foreign_keys=OFF")
    return conn


def _row_message(row: tuple[Any, ...]) -> StoredMessage:
    conv, seq, sender, client_id, ct, body, ts = row
    return StoredMessage(conv, seq, client_id, sender, ct, bytes(body), ts)


@dataclass(slots=True)
class _Conv:
    id: str
    kind: str
    name: str
    last_seq: int
    members: dict[str, Member]
    # Every message after ``tracked_from`` was appended while this state was
    # cached, and ``last_sent`` holds each of their senders' highest seq: enough
    # to find who sent in a range of seqs without a query (``senders_between``).
    tracked_from: int = 0
    last_sent: dict[str, int] = field(default_factory=dict)
    # Direct chats keep no receipt_marks rows (see _unacked_marks): the users
    # whose rows of this chat, left by an older Roost, are known to be gone.
    marks_cleared: set[str] = field(default_factory=set)

    def active(self) -> list[str]:
        return [m.user for m in self.members.values() if m.left is None]

    def senders_between(self, low: int, high: int, ignore: str = "") -> set[str] | None:
        """Who but ``ignore`` and the system sent a message with ``low < seq <=
        high``; None when memory cannot tell. Those two are skipped rather than
        discarded by the caller: the acker's own later messages (a 1:1 chat in
        which both talk) would otherwise hide the answer and cost a query."""
        if low < self.tracked_from:
            return None
        senders: set[str] = set()
        for sender, last in self.last_sent.items():
            if sender in (ignore, SYSTEM_SENDER):
                continue
            if last > low:
                if last > high:
                    return None  # a later message of theirs hides whether one is in range
                senders.add(sender)
        return senders


@dataclass(slots=True)
class _Op:
    fn: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    stream: SendStream | None = None
    # Ops with the same key in one batch collapse into the last of them,
    # their ``args`` combined by element-wise max (cumulative acks).
    key: tuple[str, ...] | None = None
    args: list[int | None] | None = None
    merged_into: _Op | None = None
    merged: list[_Op] | None = None  # the ops folded into this one, oldest first
    original: list[int | None] | None = None  # this op's own args, before folding


def _merge_cumulative(batch: list[_Op]) -> None:
    """Collapse cumulative acks of one (kind, user, conv) within a batch.

    Under load many acks of one conversation queue up while a commit is on
    disk; applying only the highest does the same work once. The survivor is
    the last one, so every seq it carries was valid at its position.
    """
    latest: dict[tuple[str, ...], _Op] = {}
    for op in batch:
        if op.key is None or op.args is None:
            continue
        prev = latest.get(op.key)
        if prev is not None and prev.args is not None:
            op.original = list(op.args)
            op.merged = [*(prev.merged or []), prev]
            prev.merged = None
            op.args[:] = [  # in place: the op's closure reads this very list
                b if a is None else a if b is None else max(a, b)
                for a, b in zip(prev.args, op.args, strict=True)
            ]
            prev.merged_into = op
        latest[op.key] = op


T = TypeVar("T")  # what a read (_read) returns


class SqliteStore:
    """The embedded store. ``path`` is the database file."""

    def __init__(
        self,
        path: Path | str,
        max_batch: int = 1024,
        cache_size: int = 100_000,
        metrics: Metrics | None = None,
        commit_interval: float = COMMIT_INTERVAL_SECONDS,
    ):
        self.path = Path(path)
        self.metrics = metrics or Metrics()
        self.max_batch = max_batch
        self.commit_interval = commit_interval
        self.cache_size = cache_size
        self._queue: queue.SimpleQueue[_Op | object | None] = queue.SimpleQueue()
        self._lazy: queue.SimpleQueue[_Op] = queue.SimpleQueue()  # ops that wait for a batch
        self._lazy_timer: asyncio.TimerHandle | None = None
        self._writer: threading.Thread | None = None
        self._wconn: sqlite3.Connection | None = None
        self._readers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="roost-read")
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        # The reads every connecting device makes, batched per loop pass:
        # one hop to a reader thread for all the logins of a pass.
        self._tokens: PassBatcher[bytes, str | None] = PassBatcher(
            self._users_by_token, lambda: None, TOKEN_BATCH
        )
        self._connect_states: PassBatcher[str, ConnectState] = PassBatcher(
            self._connect_states_of, no_connect_state, CONNECT_BATCH
        )
        self._convs: dict[str, _Conv] = {}
        # Receipts gathered while a batch runs: (conv, target) -> (changed
        # marks, the MarkResult that carries them). Built once per batch, so a
        # group's 1000 acks in one commit cost one receipt per sender, not 1000.
        self._batch_receipts: dict[tuple[str, str], tuple[dict[str, tuple[int, int]], MarkResult]] = {}
        # Conversations that got messages in this batch -> their new last seq.
        self._batch_seqs: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._closing_now = threading.Event()
        self._queued_during_commit = False
        self.commits = 0  # statistics: transactions committed
        self.committed_ops = 0

    # -- lifecycle ---------------------------------------------------------

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._wconn = _connect(self.path)
        self._migrate(self._wconn)
        self._writer = threading.Thread(target=self._write_loop, name="roost-writer", daemon=True)
        self._writer.start()

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path} has schema {version}; this Roost knows up to {SCHEMA_VERSION}")
        conn.executescript(SCHEMA)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(users)")}
        if "state" not in columns:  # schema 1: accounts could not be disabled or removed
            conn.execute("ALTER TABLE users ADD COLUMN state TEXT NOT NULL DEFAULT 'active'")
        columns = {row[1] for row in conn.execute("PRAGMA table_info(receipt_pending)")}
        if "acked" not in columns:  # schema 2: an acked receipt's row was deleted
            conn.execute("ALTER TABLE receipt_pending ADD COLUMN acked INTEGER NOT NULL DEFAULT 0")
        if version < blobmeta.SQLITE_STEP:
            blobmeta.sqlite_migrate(conn)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    async def close(self) -> None:
        """Finish every queued write, then close. Later writes are refused."""
        self._closing = True
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()  # the writer commits the lazy ops before it stops
            self._lazy_timer = None
        if self._writer is not None:
            self._closing_now.set()
            self._queue.put(None)
            await asyncio.to_thread(self._writer.join)
            self._writer = None
        self._readers.shutdown(wait=True)
        for conn in self._reader_conns:
            conn.close()
        if self._wconn is not None:
            self._wconn.close()
            self._wconn = None

    # -- the writer thread -------------------------------------------------

    def _submit(
        self,
        fn: Callable[[sqlite3.Connection], Any],
        stream: SendStream | None = None,
        key: tuple[str, ...] | None = None,
        args: list[int | None] | None = None,
        lazy: bool = False,
    ) -> asyncio.Future[Any]:
        if self._loop is None:
            raise StoreUnavailable("store is not open")
        future = self._loop.create_future()
        if self._writer is None or self._closing:
            future.set_exception(StoreUnavailable("store is closed"))
        elif lazy:
            self._lazy.put(_Op(fn, future, stream, key, args))
            if self._lazy_timer is None:
                self._lazy_timer = self._loop.call_later(LAZY_COMMIT_SECONDS, self._wake_for_lazy)
        else:
            self._queue.put(_Op(fn, future, stream, key, args))
        return future

    def _wake_for_lazy(self) -> None:
        self._lazy_timer = None
        if not self._lazy.empty():
            self._queue.put(_WAKE)

    def _write_loop(self) -> None:
        conn = self._wconn
        assert conn is not None
        stop = False
        started = -self.commit_interval
        busy = False  # the last batch showed concurrent load
        while not stop:
            first = self._queue.get()
            if busy and first is not None:
                # Under load: let this batch gather until the interval is over.
                delay = started + self.commit_interval - time.monotonic()
                if delay > 0:
                    self._closing_now.wait(delay)  # close() cuts the wait short
            started = time.monotonic()
            batch: list[_Op] = []
            if first is None:
                stop = True
            elif isinstance(first, _Op):
                batch.append(first)
            while not stop and len(batch) < self.max_batch:
                try:
                    op = self._queue.get_nowait()
                except queue.Empty:
                    break
                if op is None:
                    stop = True
                elif isinstance(op, _Op):
                    batch.append(op)
            eager = len(batch)
            # Lazy ops ride along (all of them when stopping: close() commits everything).
            while stop or len(batch) < self.max_batch:
                try:
                    batch.append(self._lazy.get_nowait())
                except queue.Empty:
                    break
            if batch:
                self._run_batch_or_fail(conn, batch)
            # Concurrent load: operations came while the batch ran, or it held
            # more than one that someone awaits. A lone client's next request
            # comes after its answer, alone: it is never paced.
            busy = self._queued_during_commit or eager > 1

    def _run_batch_or_fail(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        """Run a batch; if anything escapes ``_run_batch`` (an error before its
        ``BEGIN``, or after ``COMMIT`` while the answers are handed over), fail
        the batch's callers instead of letting the writer thread die with it:
        a dead writer leaves these callers and every later one waiting forever."""
        try:
            self._run_batch(conn, batch)
        except Exception as exc:
            self.metrics.store_error["writer_failed"].inc()
            self._batch_crashed(conn, batch, exc)

    def _batch_crashed(self, conn: sqlite3.Connection, batch: list[_Op], exc: Exception) -> None:
        # The outcome is unknown to the callers (the batch may have committed):
        # they are told the storage failed and retry, which the idempotent
        # append makes safe. Their streams break, as on any storage failure.
        with contextlib.suppress(sqlite3.Error):
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        self._convs.clear()
        self._batch_receipts.clear()
        self._batch_seqs.clear()
        for op in batch:
            if op.stream is not None:
                op.stream.broken = True
        # The details go to the server log, not to clients.
        log.error("the store writer failed a batch of %d", len(batch), exc_info=exc)
        failure = StoreUnavailable("storage error: the writer failed")
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            self._loop.call_soon_threadsafe(_resolve, batch, [(False, failure)] * len(batch))

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        _merge_cumulative(batch)
        outcome: dict[int, tuple[bool, Any]] = {}
        started = time.perf_counter()
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in batch:
                if op.merged_into is not None:
                    continue
                if op.stream is not None and op.stream.broken:
                    outcome[id(op)] = (False, StoreUnavailable("an earlier send failed"))
                    continue
                try:
                    outcome[id(op)] = (True, op.fn(conn))
                except ProtocolError as exc:
                    if op.merged:
                        self._run_unmerged(conn, op, outcome)
                    else:
                        outcome[id(op)] = (False, exc)
            self._finish_receipts(conn)
            self._finish_seqs(conn)
            conn.execute("COMMIT")
            self.commits += 1
            self.committed_ops += len(batch)
            self.metrics.commit_seconds.observe(time.perf_counter() - started)
            self.metrics.commit_batch_size.observe(len(batch))
        except Exception as exc:  # storage failed: nothing of this batch happened
            self.metrics.store_error["commit_failed"].inc()
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self._convs.clear()
            self._batch_receipts.clear()
            self._batch_seqs.clear()
            for op in batch:
                if op.stream is not None:
                    op.stream.broken = True
            failure = StoreUnavailable(f"storage error: {exc}")
            outcome = {id(op): (False, failure) for op in batch}
        # Whatever is queued now came while this batch ran (before its answers).
        self._queued_during_commit = not self._queue.empty()
        results = []
        for op in batch:
            leader = op
            while leader.merged_into is not None:
                leader = leader.merged_into
            results.append(outcome[id(leader)])
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            self._loop.call_soon_threadsafe(_resolve, batch, results)

    def _run_unmerged(
        self, conn: sqlite3.Connection, leader: _Op, outcome: dict[int, tuple[bool, Any]]
    ) -> None:
        """A folded ack was refused (e.g. one seq past the end): apply each one
        on its own instead, so a bad ack cannot cancel a good one."""
        chain = [*(leader.merged or []), leader]
        leader.merged = None
        for op in chain:
            op.merged_into = None
        if leader.original is not None and leader.args is not None:
            leader.args[:] = leader.original
        for op in chain:
            try:
                outcome[id(op)] = (True, op.fn(conn))
            except ProtocolError as exc:
                outcome[id(op)] = (False, exc)

    # -- writer-side helpers (run on the writer thread only) ---------------

    def _conv(self, conn: sqlite3.Connection, conv_id: str) -> _Conv | None:
        state = self._convs.get(conv_id)
        if state is not None:
            return state
        row = conn.execute("SELECT kind, name, last_seq FROM conversations WHERE id=?", (conv_id,)).fetchone()
        if row is None:
            return None
        members = {
            user: Member(user, role, joined, left, delivered, read)
            for user, role, joined, left, delivered, read in conn.execute(
                "SELECT user, role, joined_seq, left_seq, delivered, read FROM members WHERE conv=?",
                (conv_id,),
            )
        }
        # Evicted and reloaded within one batch: the row does not have this batch's seqs yet.
        last_seq = self._batch_seqs.get(conv_id, row[2])
        state = _Conv(conv_id, row[0], row[1], last_seq, members, tracked_from=last_seq)
        if len(self._convs) >= self.cache_size:
            self._convs.pop(next(iter(self._convs)))
        self._convs[conv_id] = state
        return state

    def _existing_users(self, conn: sqlite3.Connection, names: list[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(names), 500):
            chunk = names[start : start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(
                r[0]
                for r in conn.execute(
                    f"SELECT name FROM users WHERE name IN ({marks}) AND state <> 'removed'", chunk
                )
            )
        return found

    def _require_users(self, conn: sqlite3.Connection, names: list[str]) -> None:
        missing = sorted(set(names) - self._existing_users(conn, names))
        if missing:
            raise ProtocolError(ErrorCode.UNKNOWN_USER, f"no such user: {', '.join(missing[:5])}")

    def _insert_message(
        self,
        conn: sqlite3.Connection,
        state: _Conv,
        sender: str,
        client_id: str,
        ct: str,
        body: bytes,
        now: int,
    ) -> StoredMessage | None:
        """Store the next message of ``state``; None if (sender, client id) is taken."""
        seq = state.last_seq + 1
        # The idempotency index does the duplicate check: no SELECT before every insert.
        inserted = conn.execute(
            f"INSERT INTO messages ({_MSG_COLUMNS}) VALUES (?,?,?,?,?,?,?)"
            " ON CONFLICT (conv, sender, client_id) DO NOTHING",
            (state.id, seq, sender, client_id, ct, body, now),
        ).rowcount
        if inserted == 0:
            return None
        state.last_seq = seq
        state.last_sent[sender] = seq
        # conversations.last_seq is written once per batch (_finish_batch).
        self._batch_seqs[state.id] = seq
        recipients = tuple(u for u in state.active() if u != sender)
        return StoredMessage(state.id, seq, client_id, sender, ct, body, now, False, recipients)

    def _create_direct(self, conn: sqlite3.Connection, sender: str, to: str, now: int) -> _Conv:
        if to == sender:
            raise ProtocolError(ErrorCode.INVALID, "cannot send a 1:1 message to yourself")
        self._require_users(conn, [to])
        conv_id = direct_conv_id(sender, to)
        conn.execute(
            "INSERT INTO conversations (id, kind, name, last_seq, created) VALUES (?,?,?,?,?)",
            (conv_id, "direct", "", 0, now),
        )
        for user in (sender, to):
            conn.execute(
                "INSERT INTO members (conv, user, role, joined_seq, left_seq, delivered, read)"
                " VALUES (?,?,?,0,NULL,0,0)",
                (conv_id, user, MEMBER),
            )
        state = _Conv(conv_id, "direct", "", 0, {u: Member(u, MEMBER, 0, None, 0, 0) for u in (sender, to)})
        self._convs[conv_id] = state
        return state

    def _write_marks(self, conn: sqlite3.Connection, conv: str, member: Member) -> None:
        conn.execute(
            "UPDATE members SET delivered=?, read=? WHERE conv=? AND user=?",
            (member.delivered, member.read, conv, member.user),
        )

    def _bump_receipt(self, conn: sqlite3.Connection, user: str, conv: str) -> int:
        row = conn.execute(
            "INSERT INTO receipt_pending (user, conv, rv) VALUES (?,?,1)"
            " ON CONFLICT (user, conv) DO UPDATE SET rv = rv + 1 RETURNING rv",
            (user, conv),
        ).fetchone()
        return int(row[0])

    # -- accounts ----------------------------------------------------------

    def add_user(self, name: str, token_hash: bytes, now: int) -> asyncio.Future[None]:
        def op(conn: sqlite3.Connection) -> None:
            state = _account_state(conn, name)
            if state == REMOVED:
                raise ProtocolError(ErrorCode.INVALID, f"user {name!r} was removed; names are not reused")
            if state is not None:
                raise ProtocolError(ErrorCode.INVALID, f"user {name!r} already exists")
            conn.execute(
                "INSERT INTO users (name, token_hash, created) VALUES (?,?,?)",
                (name, token_hash, now),
            )

        return self._submit(op)

    def set_last_seen(self, user: str, ts: int) -> asyncio.Future[None]:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE users SET last_seen=? WHERE name=?", (ts, user))

        return self._submit(op)

    def set_token(self, name: str, token_hash: bytes) -> asyncio.Future[None]:
        def op(conn: sqlite3.Connection) -> None:
            _require_account(conn, name)
            conn.execute("UPDATE users SET token_hash=? WHERE name=?", (token_hash, name))

        return self._submit(op)

    def set_user_state(self, name: str, state: str) -> asyncio.Future[None]:
        """'active' or 'disabled'; 'removed' also voids the token for good."""

        def op(conn: sqlite3.Connection) -> None:
            if state == REMOVED:
                if _account_state(conn, name) is None:
                    raise ProtocolError(ErrorCode.UNKNOWN_USER, f"no such user: {name}")
                conn.execute(
                    "UPDATE users SET state=?, token_hash=? WHERE name=?",
                    (REMOVED, removed_token(name), name),
                )
                return
            _require_account(conn, name)
            conn.execute("UPDATE users SET state=? WHERE name=?", (state, name))

        return self._submit(op)

    def purge_member(self, name: str) -> asyncio.Future[None]:
        """Forget a removed user's member rows (its inbox and marks, in every
        conversation), its pending receipts and its published keys. The
        messages it sent stay."""

        def op(conn: sqlite3.Connection) -> None:
            for (conv,) in conn.execute("SELECT conv FROM members WHERE user=?", (name,)).fetchall():
                cached = self._convs.get(conv)
                if cached is not None:
                    cached.members.pop(name, None)
            conn.execute("DELETE FROM members WHERE user=?", (name,))
            conn.execute("DELETE FROM receipt_pending WHERE user=?", (name,))
            conn.execute("DELETE FROM receipt_marks WHERE user=? OR member=?", (name, name))
            sqlite_keys.delete_keys(conn, name)

        return self._submit(op)

    # -- the key directory -------------------------------------------------

    def put_keys(self, upload: KeyUpload) -> asyncio.Future[KeyStock]:
        return self._submit(lambda c: sqlite_keys.put_keys(c, upload))

    def take_keys(self, owner: str) -> asyncio.Future[list[DeviceKeys]]:
        return self._submit(lambda c: sqlite_keys.take_keys(c, owner))

    async def key_stock(self, user: str, device: int) -> KeyStock:
        return await self._read(lambda c: sqlite_keys.key_stock(c, user, device))

    # -- messages ----------------------------------------------------------

    def append(
        self,
        sender: str,
        client_id: str,
        ct: str,
        body: bytes,
        now: int,
        to: str | None = None,
        conv: str | None = None,
        stream: SendStream | None = None,
    ) -> asyncio.Future[StoredMessage]:
        def op(c: sqlite3.Connection) -> StoredMessage:
            conv_id = direct_conv_id(sender, to) if to is not None else conv
            assert conv_id is not None
            state = self._conv(c, conv_id)
            if state is None:
                if to is None:
                    raise ProtocolError(
                        ErrorCode.UNKNOWN_CONVERSATION, f"no conversation {conv_id}", client_id
                    )
                state = self._create_direct(c, sender, to, now)
            member = state.members.get(sender)
            if member is None or member.left is not None:
                # A retry of a message committed while the sender was a member
                # (its answer was lost) still gets its original answer.
                retried = self._retried(c, state, sender, client_id)
                if retried is not None:
                    return retried
            rules.require_active(member, conv_id)
            if state.kind == "direct" and len(state.members) < 2:
                peer = to or next(u for u in direct_members(conv_id) or () if u != sender)
                raise ProtocolError(ErrorCode.UNKNOWN_USER, f"no such user: {peer} (removed)", client_id)
            stored = self._insert_message(c, state, sender, client_id, ct, body, now)
            if stored is not None:
                return stored
            # This client id was stored before: a retry gets the stored message.
            retried = self._retried(c, state, sender, client_id)
            assert retried is not None
            return retried

        return self._submit(op, stream)

    def _retried(
        self, c: sqlite3.Connection, state: _Conv, sender: str, client_id: str
    ) -> StoredMessage | None:
        """The message ``sender`` stored with ``client_id``, as a duplicate; None if none."""
        row = c.execute(
            f"SELECT {_MSG_COLUMNS} FROM messages WHERE conv=? AND sender=? AND client_id=?",
            (state.id, sender, client_id),
        ).fetchone()
        if row is None:
            return None
        stored = _row_message(row)
        # With its recipients: the service fans a duplicate out again, in
        # case the first commit's answer (and so its push) was lost. The
        # members when it was sent: never someone who joined later.
        recipients = tuple(
            u for u, m in state.members.items()
            if u != sender and m.joined < stored.seq and (m.left is None or m.left >= stored.seq)
        )  # fmt: skip
        return StoredMessage(
            stored.conv,
            stored.seq,
            stored.client_id,
            stored.sender,
            stored.ct,
            stored.body,
            stored.ts,
            True,
            recipients,
        )

    def advance_marks(
        self, user: str, conv: str, delivered: int | None, read: int | None
    ) -> asyncio.Future[MarkResult]:
        args: list[int | None] = [delivered, read]

        def op(c: sqlite3.Connection) -> MarkResult:
            delivered, read = args  # possibly raised by merged later acks
            state = self._conv(c, conv)
            if state is None:
                raise ProtocolError(ErrorCode.UNKNOWN_CONVERSATION, f"no conversation {conv}")
            member = rules.require_visible(state.members.get(user), conv)
            old_d, old_r = member.delivered, member.read
            new_d, new_r = rules.advance_marks(member, state.last_seq, delivered, read)
            if (new_d, new_r) == (old_d, old_r):
                return MarkResult(conv, user, new_d, new_r)
            member.delivered, member.read = new_d, new_r
            self._write_marks(c, conv, member)
            low = min(old_d, old_r) if new_r > old_r else old_d
            senders = state.senders_between(low, new_d, ignore=user)
            if senders is None:
                senders = {
                    r[0]
                    for r in c.execute(
                        "SELECT DISTINCT sender FROM messages WHERE conv=? AND seq>? AND seq<=?",
                        (conv, low, new_d),
                    )
                }
            senders.discard(user)
            senders.discard(SYSTEM_SENDER)
            result = MarkResult(conv, user, new_d, new_r, [])
            for target in senders:
                marks, _ = self._batch_receipts.get((conv, target), ({}, result))
                marks[user] = (new_d, new_r)
                # The latest ack of the batch carries the receipt.
                self._batch_receipts[(conv, target)] = (marks, result)
            return result

        return self._submit(op, key=("mark", user, conv), args=args)

    def _finish_receipts(self, c: sqlite3.Connection) -> None:
        """Turn the batch's mark changes into one pending receipt per (conv, sender)."""
        for (conv, target), (marks, carrier) in self._batch_receipts.items():
            state = self._conv(c, conv)
            if state is None:
                continue
            rv = self._bump_receipt(c, target, conv)
            marks = self._unacked_marks(c, state, target, rv, marks)
            all_d, all_r = _aggregate(state, target)
            carrier.receipts.append(ReceiptState(target, conv, rv, marks, all_d, all_r))
        self._batch_receipts.clear()

    def _unacked_marks(
        self, c: sqlite3.Connection, state: _Conv, target: str, rv: int, changed: dict[str, tuple[int, int]]
    ) -> dict[str, tuple[int, int]]:
        """The marks changed in this batch are remembered at ``rv``; the
        receipt carries them and every other mark not yet acked (a receipt
        before this one may have been lost, and this one's ack clears them)."""
        if state.kind == "direct":
            # The only mark a direct receipt can carry is the peer's, and it
            # changed in this batch: nothing to remember, nothing older to
            # add (a reconnect's pending receipts are built from the members
            # table anyway). Three statements per 1:1 message fewer.
            return dict(changed)
        c.executemany(
            "INSERT INTO receipt_marks (user, conv, member, rv) VALUES (?,?,?,?)"
            " ON CONFLICT (user, conv, member) DO UPDATE SET rv = excluded.rv",
            [(target, state.id, member, rv) for member in changed],
        )
        marks = dict(changed)
        for (member,) in c.execute(
            "SELECT member FROM receipt_marks WHERE user=? AND conv=? AND rv<?", (target, state.id, rv)
        ):
            found = state.members.get(member)
            if found is not None:
                marks[member] = (found.delivered, found.read)
        return marks

    def _finish_seqs(self, c: sqlite3.Connection) -> None:
        """One last_seq update per conversation per batch, not one per message."""
        if self._batch_seqs:
            c.executemany(
                "UPDATE conversations SET last_seq=? WHERE id=?",
                [(seq, conv) for conv, seq in self._batch_seqs.items()],
            )
            self._batch_seqs.clear()

    def ack_receipts(self, user: str, conv: str, rv: int) -> asyncio.Future[None]:
        args: list[int | None] = [rv]

        def op(c: sqlite3.Connection) -> None:
            # Refused like a dack there: unknown conversation, or never a member
            # (one who left still acks receipts for what they sent before).
            state = self._conv(c, conv)
            if state is None:
                raise ProtocolError(ErrorCode.UNKNOWN_CONVERSATION, f"no conversation {conv}")
            rules.require_visible(state.members.get(user), conv)
            # The row stays: rv goes on from here, never reused by a new receipt.
            rv = args[0]
            c.execute(
                "UPDATE receipt_pending SET acked = MAX(acked, ?) WHERE user=? AND conv=?", (rv, user, conv)
            )
            if state.kind != "direct":
                c.execute("DELETE FROM receipt_marks WHERE user=? AND conv=? AND rv<=?", (user, conv, rv))
            elif user not in state.marks_cleared:
                # Rows an older Roost kept for direct chats are read by nothing
                # now: all of them go at the first ack after the chat is cached.
                c.execute("DELETE FROM receipt_marks WHERE user=? AND conv=?", (user, conv))
                state.marks_cleared.add(user)

        return self._submit(op, key=("rack", user, conv), args=args, lazy=True)

    # -- groups ------------------------------------------------------------

    def _membership_event(
        self,
        c: sqlite3.Connection,
        state: _Conv,
        actor: str,
        action: str,
        users: list[str],
        now: int,
        extra: dict[str, Any] | None = None,
    ) -> StoredMessage:
        body = json.dumps(
            {"action": action, "actor": actor, "users": users, "name": state.name, **(extra or {})},
            separators=(",", ":"),
        ).encode()
        client_id = f"sys-{state.last_seq + 1}"
        stored = self._insert_message(c, state, SYSTEM_SENDER, client_id, MEMBERSHIP_CT, body, now)
        assert stored is not None, "system message ids are unique per seq"
        return stored

    @staticmethod
    def _returning(c: sqlite3.Connection, state: _Conv, users: list[str]) -> dict[str, str]:
        """Of ``users``, those who were members before: user -> how they went
        ("removed" or "left"). A member re-added while offline never sees the
        event that took it out (it sees the group from its new ``added`` on),
        so the ``added`` event says it."""
        out: dict[str, str] = {}
        for user in users:
            member = state.members.get(user)
            if member is None or member.left is None:
                continue
            row = c.execute(
                "SELECT body FROM messages WHERE conv=? AND seq=?", (state.id, member.left)
            ).fetchone()
            action = json.loads(row[0]).get("action") if row is not None else None
            out[user] = action if action in ("removed", "left") else "removed"
        return out

    def _join(self, c: sqlite3.Connection, state: _Conv, user: str, role: str) -> None:
        # The member sees everything after this point, starting with the
        # membership event that is appended right after.
        at = state.last_seq
        c.execute(
            "INSERT INTO members (conv, user, role, joined_seq, left_seq, delivered, read)"
            " VALUES (?,?,?,?,NULL,?,?) ON CONFLICT (conv, user) DO UPDATE SET"
            " role=excluded.role, joined_seq=excluded.joined_seq, left_seq=NULL,"
            " delivered=excluded.delivered, read=excluded.read",
            (state.id, user, role, at, at, at),
        )
        state.members[user] = Member(user, role, at, None, at, at)

    def _snapshot(
        self, state: _Conv, event: StoredMessage | None = None, removed: tuple[str, ...] = ()
    ) -> GroupSnapshot:
        active = [m for m in state.members.values() if m.left is None]
        return GroupSnapshot(
            state.id,
            state.name,
            sorted(m.user for m in active),
            sorted(m.user for m in active if m.role == ADMIN),
            state.last_seq,
            event,
            removed,
        )

    def _group(self, c: sqlite3.Connection, group: str) -> _Conv:
        state = self._conv(c, group)
        if state is None or state.kind != "group":
            raise ProtocolError(ErrorCode.UNKNOWN_CONVERSATION, f"no group {group}")
        return state

    def create_group(
        self, creator: str, group: str, name: str, members: list[str], limit: int, now: int
    ) -> asyncio.Future[GroupSnapshot]:
        wanted = sorted(set(members) | {creator})

        def op(c: sqlite3.Connection) -> GroupSnapshot:
            rules.check_group_size(0, len(wanted), limit)
            self._require_users(c, wanted)
            c.execute(
                "INSERT INTO conversations (id, kind, name, last_seq, created) VALUES (?,?,?,?,?)",
                (group, "group", name, 0, now),
            )
            state = _Conv(group, "group", name, 0, {})
            self._convs[group] = state
            for user in wanted:
                self._join(c, state, user, ADMIN if user == creator else MEMBER)
            event = self._membership_event(c, state, creator, "created", wanted, now)
            return self._snapshot(state, event)

        return self._submit(op)

    def add_members(
        self, actor: str, group: str, members: list[str], limit: int, now: int
    ) -> asyncio.Future[GroupSnapshot]:
        def op(c: sqlite3.Connection) -> GroupSnapshot:
            state = self._group(c, group)
            rules.require_admin(state.members.get(actor), group)
            current = set(state.active())
            new = sorted(set(members) - current)
            if not new:
                return self._snapshot(state)
            rules.check_group_size(len(current), len(new), limit)
            self._require_users(c, new)
            returning = self._returning(c, state, new)
            for user in new:
                self._join(c, state, user, MEMBER)
            extra = {"returning": returning} if returning else None
            event = self._membership_event(c, state, actor, "added", new, now, extra)
            return self._snapshot(state, event)

        return self._submit(op)

    def remove_members(
        self, actor: str, group: str, members: list[str], now: int
    ) -> asyncio.Future[GroupSnapshot]:
        def op(c: sqlite3.Connection) -> GroupSnapshot:
            state = self._group(c, group)
            leaving = members == [actor]
            if leaving:
                rules.require_active(state.members.get(actor), group)
            elif actor != rules.ADMINISTRATOR:
                rules.require_admin(state.members.get(actor), group)
            gone = sorted(set(members) & set(state.active()))
            if not gone:
                return self._snapshot(state)
            # The removed see their own removal event, then nothing more.
            event = self._membership_event(c, state, actor, "left" if leaving else "removed", gone, now)
            for user in gone:
                member = state.members[user]
                member.left = event.seq
                c.execute(
                    "UPDATE members SET left_seq=? WHERE conv=? AND user=?",
                    (event.seq, group, user),
                )
            # Recipients of the event include the removed members.
            event = StoredMessage(
                event.conv,
                event.seq,
                event.client_id,
                event.sender,
                event.ct,
                event.body,
                event.ts,
                False,
                tuple(sorted(set(event.recipients) | set(gone))),
            )
            self._promote_if_no_admin(c, state)
            snapshot = self._snapshot(state, event, tuple(gone))
            self._receipts_after_removal(c, state, gone, snapshot)
            return snapshot

        return self._submit(op)

    def _receipts_after_removal(
        self, c: sqlite3.Connection, state: _Conv, gone: list[str], snapshot: GroupSnapshot
    ) -> None:
        """The aggregates are over the members that remain: a removed member
        may have been the last one a message waited for. Every remaining
        sender of a message past the lowest read mark of the removed gets a
        receipt (committed with the removal), as if the last ack had come."""
        low = min(state.members[user].read for user in gone)
        high = state.last_seq
        senders = state.senders_between(low, high)
        if senders is None:
            senders = {
                r[0]
                for r in c.execute(
                    "SELECT DISTINCT sender FROM messages WHERE conv=? AND seq>? AND seq<=?",
                    (state.id, low, high),
                )
            }
        carrier = MarkResult(state.id, "", 0, 0, snapshot.receipts)
        for target in senders:
            member = state.members.get(target)
            if target == SYSTEM_SENDER or member is None or member.left is not None:
                continue
            marks, _ = self._batch_receipts.get((state.id, target), ({}, carrier))
            self._batch_receipts[(state.id, target)] = (marks, carrier)

    def _promote_if_no_admin(self, c: sqlite3.Connection, state: _Conv) -> None:
        active = [m for m in state.members.values() if m.left is None]
        if active and not any(m.role == ADMIN for m in active):
            heir = min(active, key=lambda m: (m.joined, m.user))
            heir.role = ADMIN
            c.execute("UPDATE members SET role=? WHERE conv=? AND user=?", (ADMIN, state.id, heir.user))

    # -- reads (reader threads) ---------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path)
            self._local.conn = conn
            self._reader_conns.append(conn)
        return conn

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()

        def run() -> T:
            conn = self._reader()
            try:
                conn.execute("BEGIN")
                try:
                    return fn(conn)
                finally:
                    conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"storage error: {exc}") from exc

        try:
            return await loop.run_in_executor(self._readers, run)
        except RuntimeError as exc:  # executor shut down
            raise StoreUnavailable(str(exc)) from exc

    # -- blob metadata (roost/store/blobmeta.py) ----------------------------

    def blob_create(self, rec: blobmeta.BlobRecord, quota: int) -> asyncio.Future[None]:
        """Record a new upload; ``quota_exceeded`` if the owner's blobs would pass ``quota``."""
        return self._submit(lambda c: blobmeta.sqlite_create(c, rec, quota))

    async def blob_get(self, blob: str) -> blobmeta.BlobRecord | None:
        return await self._read(lambda c: blobmeta.sqlite_get(c, blob))

    def blob_complete(self, blob: str, now: int) -> asyncio.Future[None]:
        return self._submit(lambda c: blobmeta.sqlite_complete(c, blob, now))

    def blob_fetching(self, blob: str, until: int) -> asyncio.Future[bool]:
        """A download URL valid until ``until`` (ms) is handed out; False: the blob is not complete."""
        return self._submit(lambda c: blobmeta.sqlite_fetching(c, blob, until))

    async def blobs_due(
        self, now: int, pending_before: int, complete_before: int, limit: int
    ) -> list[blobmeta.BlobRecord]:
        return await self._read(lambda c: blobmeta.sqlite_due(c, now, pending_before, complete_before, limit))

    def blob_claim(self, blob: str, now: int) -> asyncio.Future[str | None]:
        """Claim for deletion (no URL valid at ``now`` ms); its previous state, or None."""
        return self._submit(lambda c: blobmeta.sqlite_claim(c, blob, now))

    def blob_unclaim(self, blob: str, state: str) -> asyncio.Future[None]:
        return self._submit(lambda c: blobmeta.sqlite_unclaim(c, blob, state))

    def blob_delete(self, blob: str) -> asyncio.Future[None]:
        return self._submit(lambda c: blobmeta.sqlite_delete(c, blob))

    async def user_by_token(self, token_hash: bytes) -> str | None:
        return await self._tokens.get(token_hash)

    async def _users_by_token(self, token_hashes: list[bytes]) -> dict[bytes, str | None]:
        def fn(c: sqlite3.Connection) -> dict[bytes, str | None]:
            found: dict[bytes, str | None] = {}
            for token_hash in token_hashes:
                row = c.execute(
                    "SELECT name FROM users WHERE token_hash=? AND state='active'", (token_hash,)
                ).fetchone()
                if row is not None:
                    found[token_hash] = row[0]
            return found

        return await self._read(fn)

    async def list_users(self) -> list[Account]:
        def fn(c: sqlite3.Connection) -> list[Account]:
            rows = c.execute("SELECT name, created, state, last_seen FROM users ORDER BY name").fetchall()
            return [Account(*row) for row in rows]

        return await self._read(fn)

    async def active_groups(self, name: str) -> list[str]:
        """The groups ``name`` is an active member of."""

        def fn(c: sqlite3.Connection) -> list[str]:
            rows = c.execute(
                "SELECT m.conv FROM members m JOIN conversations c ON c.id = m.conv"
                " WHERE m.user=? AND m.left_seq IS NULL AND c.kind='group' ORDER BY m.conv",
                (name,),
            ).fetchall()
            return [row[0] for row in rows]

        return await self._read(fn)

    async def last_seen(self, users: list[str]) -> dict[str, int | None]:
        def fn(c: sqlite3.Connection) -> dict[str, int | None]:
            out: dict[str, int | None] = {}
            for user in users:
                row = c.execute("SELECT last_seen FROM users WHERE name=?", (user,)).fetchone()
                if row is not None:
                    out[user] = row[0]
            return out

        return await self._read(fn)

    async def inbox(self, user: str) -> list[InboxEntry]:
        return await self._read(lambda c: _inbox(c, user))

    async def connect_state(self, user: str) -> ConnectState:
        return await self._connect_states.get(user)

    async def _connect_states_of(self, users: list[str]) -> dict[str, ConnectState]:
        def fn(c: sqlite3.Connection) -> dict[str, ConnectState]:
            return {
                user: ConnectState(
                    _inbox(c, user), _pending_receipts(c, user), sqlite_keys.key_stock(c, user, 1)
                )
                for user in users
            }

        return await self._read(fn)

    def _member_row(self, c: sqlite3.Connection, user: str, conv: str) -> tuple[Member, int]:
        row = c.execute(
            "SELECT m.role, m.joined_seq, m.left_seq, m.delivered, m.read, c.last_seq"
            " FROM members m JOIN conversations c ON c.id = m.conv"
            " WHERE m.conv=? AND m.user=?",
            (conv, user),
        ).fetchone()
        if row is None:
            exists = c.execute("SELECT 1 FROM conversations WHERE id=?", (conv,)).fetchone()
            pair = direct_members(conv)
            if exists is None and pair is not None and user in pair:
                # A 1:1 chat nobody wrote in yet: empty, not forbidden.
                return Member(user, MEMBER, 0, None, 0, 0), 0
            if exists is None and pair is None:
                raise ProtocolError(ErrorCode.UNKNOWN_CONVERSATION, f"no conversation {conv}")
            raise ProtocolError(ErrorCode.NOT_MEMBER, f"not a member of {conv}")
        role, joined, left, delivered, read, last = row
        return Member(user, role, joined, left, delivered, read), last

    async def read_inboxes(
        self, user: str, reads: Sequence[DrainRequest], budget: int
    ) -> list[DrainPage | ProtocolError]:
        def fn(c: sqlite3.Connection) -> list[DrainPage | ProtocolError]:
            found = self._member_rows(c, user, [read.conv for read in reads])
            pages: list[DrainPage | ProtocolError] = []
            left = budget
            for read in reads:
                if left <= 0:
                    break
                try:
                    member, last = found.get(read.conv) or self._member_row(c, user, read.conv)
                except ProtocolError as exc:
                    pages.append(exc)
                    continue
                page = _inbox_page(c, user, read.conv, member, last, read.after, min(read.limit, left))
                pages.append(page)
                left -= len(page.messages)
            return pages

        return await self._read(fn)

    @staticmethod
    def _member_rows(c: sqlite3.Connection, user: str, convs: list[str]) -> dict[str, tuple[Member, int]]:
        """The member rows of ``user`` in the ``convs`` it belongs to, in one query."""
        rows = c.execute(
            "SELECT m.conv, m.role, m.joined_seq, m.left_seq, m.delivered, m.read, c.last_seq"
            " FROM members m JOIN conversations c ON c.id = m.conv"
            f" WHERE m.user=? AND m.conv IN ({','.join('?' * len(convs))})",
            (user, *convs),
        ).fetchall()
        return {
            conv: (Member(user, role, joined, left, delivered, read), last)
            for conv, role, joined, left, delivered, read, last in rows
        }

    async def history(
        self, user: str, conv: str, before: int | None, after: int | None, limit: int
    ) -> tuple[list[StoredMessage], int, int]:
        def fn(c: sqlite3.Connection) -> tuple[list[StoredMessage], int, int]:
            member, last = self._member_row(c, user, conv)
            low = member.joined
            high = member.visible_upto(last)
            if after is not None:
                rows = c.execute(
                    f"SELECT {_MSG_COLUMNS} FROM messages WHERE conv=? AND seq>? AND seq<=?"
                    " ORDER BY seq LIMIT ?",
                    (conv, max(after, low), high, limit),
                ).fetchall()
                rows = _within_budget(rows)
            else:
                top = high if before is None else min(before - 1, high)
                rows = c.execute(
                    f"SELECT {_MSG_COLUMNS} FROM messages WHERE conv=? AND seq>? AND seq<=?"
                    " ORDER BY seq DESC LIMIT ?",
                    (conv, low, top, limit),
                ).fetchall()
                rows = _within_budget(rows)
                rows.reverse()
            return [_row_message(r) for r in rows], low + 1, high

        return await self._read(fn)

    async def group_info(self, user: str, group: str) -> GroupSnapshot:
        def fn(c: sqlite3.Connection) -> GroupSnapshot:
            row = c.execute("SELECT kind, name, last_seq FROM conversations WHERE id=?", (group,)).fetchone()
            if row is None or row[0] != "group":
                raise ProtocolError(ErrorCode.UNKNOWN_CONVERSATION, f"no group {group}")
            members = c.execute("SELECT user, role, left_seq FROM members WHERE conv=?", (group,)).fetchall()
            if not any(u == user and left is None for u, _, left in members):
                raise ProtocolError(ErrorCode.NOT_MEMBER, f"not a member of {group}")
            active = sorted(u for u, _, left in members if left is None)
            admins = sorted(u for u, role, left in members if left is None and role == ADMIN)
            return GroupSnapshot(group, row[1], active, admins, row[2])

        return await self._read(fn)

    async def active_members(self, user: str, conv: str) -> list[str]:
        def fn(c: sqlite3.Connection) -> list[str]:
            member, _ = self._member_row(c, user, conv)
            rules.require_active(member, conv)
            return [
                r[0] for r in c.execute("SELECT user FROM members WHERE conv=? AND left_seq IS NULL", (conv,))
            ]

        return await self._read(fn)

    async def pending_receipts(self, user: str) -> list[ReceiptState]:
        return await self._read(lambda c: _pending_receipts(c, user))


HISTORY_PAGE_BYTES = 1024 * 1024


def _inbox(c: sqlite3.Connection, user: str) -> list[InboxEntry]:
    rows = c.execute(
        "SELECT m.conv, m.delivered, c.last_seq, m.left_seq FROM members m"
        " JOIN conversations c ON c.id = m.conv"
        " WHERE m.user=? AND c.last_seq > m.delivered"
        " AND (m.left_seq IS NULL OR m.left_seq > m.delivered)",
        (user,),
    ).fetchall()
    return [
        InboxEntry(conv, delivered, last if left is None else min(left, last))
        for conv, delivered, last, left in rows
    ]


def _pending_receipts(c: sqlite3.Connection, user: str) -> list[ReceiptState]:
    out = []
    for conv, rv in c.execute(
        "SELECT conv, rv FROM receipt_pending WHERE user=? AND rv > acked", (user,)
    ).fetchall():
        rows = c.execute(
            "SELECT user, joined_seq, delivered, read, left_seq FROM members WHERE conv=?", (conv,)
        ).fetchall()
        # Members who left and had got something are named too: the
        # sender may have been away when they acked, and must still
        # learn it. The aggregate (everyone has ...) is over current members.
        marks = {u: (d, r) for u, j, d, r, left in rows if u != user and (left is None or d > j)}
        current = [(d, r) for u, _j, d, r, left in rows if u != user and left is None]
        all_d = min((d for d, _ in current), default=0)
        all_r = min((r for _, r in current), default=0)
        out.append(ReceiptState(user, conv, rv, marks, all_d, all_r))
    return out


def _inbox_page(
    c: sqlite3.Connection, user: str, conv: str, member: Member, last: int, after: int | None, limit: int
) -> DrainPage:
    start = member.delivered if after is None else max(after, member.joined)
    upto = member.visible_upto(last)
    rows = c.execute(
        f"SELECT {_MSG_COLUMNS} FROM messages WHERE conv=? AND seq>? AND seq<=? ORDER BY seq LIMIT ?",
        (conv, start, upto, limit * 4),
    ).fetchall()
    messages: list[StoredMessage] = []
    scanned = start
    for row in rows:
        if len(messages) >= limit:
            break
        scanned = row[1]
        if row[2] != user:
            messages.append(_row_message(row))
    return DrainPage(conv, start, messages, scanned, upto)


def _within_budget(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Cut a page after ~1 MiB of bodies (at least one message), so a page of
    large messages stays a reasonable frame; the client asks for the rest."""
    total = 0
    for i, row in enumerate(rows):
        total += len(row[5])
        if total > HISTORY_PAGE_BYTES and i > 0:
            return rows[:i]
    return rows


def _aggregate(state: _Conv, target: str) -> tuple[int, int]:
    """Minimum delivered / read over the active members other than ``target``."""
    others = [m for m in state.members.values() if m.user != target and m.left is None]
    if not others:
        return 0, 0
    return min(m.delivered for m in others), min(m.read for m in others)


def _resolve(batch: list[_Op], results: list[tuple[bool, Any]]) -> None:
    for op, (ok, value) in zip(batch, results, strict=True):
        if op.future.done():
            continue
        if ok:
            op.future.set_result(value)
        else:
            op.future.set_exception(value)


def _account_state(conn: sqlite3.Connection, name: str) -> str | None:
    row = conn.execute("SELECT state FROM users WHERE name=?", (name,)).fetchone()
    return None if row is None else str(row[0])


def _require_account(conn: sqlite3.Connection, name: str) -> None:
    """Refuse an account that does not exist, or no longer does."""
    state = _account_state(conn, name)
    if state is None:
        raise ProtocolError(ErrorCode.UNKNOWN_USER, f"no such user: {name}")
    if state == REMOVED:
        raise ProtocolError(ErrorCode.UNKNOWN_USER, f"no such user: {name} (removed)")


def database_path(data_dir: Path | str) -> Path:
    return Path(data_dir) / "roost.sqlite"
