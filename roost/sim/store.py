"""The production SQLite store, driven on the simulator's clock.

The simulator runs the real ``SqliteStore`` code (its schema, the operation
closures, ``_run_batch`` with its ack folding, receipts and failure path) on
one in-memory SQLite connection, so the store semantics under test are
exactly the embedded store's. What is replaced is only the threading: the
writer thread becomes a task-free scheduler on the virtual clock (a batch
takes everything queued, "fsyncs" for a seeded time, then runs and commits
through the writer's own guard), and reads run on the same connection (see
below for when they take their snapshot). An in-memory
model of the store would be faster but would have to re-implement, and could
drift from, the semantics it is meant to check.

Faults, each decided from the run's seed, at every step where real storage
fails:

* ``fail_batches(steps)``: each of the next ``len(steps)`` batches hits an
  I/O error at its step: at ``BEGIN`` (before the batch), at a statement
  ``inside`` it, or at ``COMMIT`` (the commit itself raises; nothing is
  durable). The real failure path rolls back, drops the writer cache and
  breaks the send streams.
* ``writer_crash(step)``: the writer meets an unexpected error (not an I/O
  error): ``before`` the batch (outside its transaction), or ``after`` its
  ``COMMIT`` while the answers are handed over (durable, but every caller is
  told it failed). Both end in ``SqliteStore._batch_crashed``, the handler
  of the production guard (``_run_batch_or_fail``) that keeps the writer
  thread alive.
* ``crash(after_commit)``: the database process dies. The batch on disk is
  committed or not; every caller still waiting gets ``StoreUnavailable``
  (the connection broke), including the one whose batch did commit. The
  store stays down (every batch fails, reads fail) until ``restart``, which
  comes back with exactly what was committed (the writer cache is rebuilt
  from the tables).
* ``fail_reads(seconds)``: half of the reads fail (an I/O error on the reader).
* ``slow_reads(seconds)``: reads answer 5-80 ms after their snapshot.

Reads, like SQLite's in WAL mode, see the database as of their snapshot,
taken when the read starts; the answer comes back later (a reader thread,
then the event loop), so commits, and the pushes they make, race it: a read
can return a state older than pushes the session already got.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
from collections import deque
from collections.abc import Callable
from typing import Any

from roost.store.base import (
    ConnectState,
    GroupSnapshot,
    InboxEntry,
    MarkResult,
    SendStream,
    StoredMessage,
    StoreUnavailable,
)
from roost.store.sqlite import LAZY_COMMIT_SECONDS, SqliteStore, _Op


class _SameThread:
    """What ``SqliteStore`` needs of its loop, minus the cross-thread wakeup;
    it also shows the simulator each committed batch's results."""

    def __init__(self, loop: asyncio.AbstractEventLoop, committed: Callable[[list[Any]], None]) -> None:
        self.loop = loop
        self.create_future = loop.create_future
        self._committed = committed
        self.lose_answer = False  # the next hand-over of a batch's answers fails

    def call_soon_threadsafe(self, resolve: Callable[..., None], batch: Any, results: list[Any]) -> None:
        if self.lose_answer:
            # After COMMIT: the batch is durable, its answers never reach the loop.
            self.lose_answer = False
            self._committed(results)
            # Not a RuntimeError: _run_batch takes that for a closed loop and ignores it.
            raise ValueError("simulated writer crash after COMMIT")
        self._committed(results)
        self.loop.call_soon(resolve, batch, results)


STORE_FAIL_STEPS = ("begin", "inside", "commit")
READ_WAIT = (0.00002, 0.0003)  # until a reader thread takes the read: then its snapshot
SLOW_READ = (0.005, 0.08)  # a slow answer: the reader thread or the loop is behind


# What the store must never commit, recorded by the database itself: a
# trigger's row is rolled back with its transaction, so only committed
# regressions are seen (marks are the inbox and the receipts: they only move
# forward).
WATCHES = """
CREATE TABLE sim_marks_backwards (conv TEXT, user TEXT, old_d INT, old_r INT, new_d INT, new_r INT);
CREATE TRIGGER sim_marks_forward AFTER UPDATE OF delivered, read ON members
WHEN NEW.delivered < OLD.delivered OR NEW.read < OLD.read
BEGIN
    INSERT INTO sim_marks_backwards
    VALUES (NEW.conv, NEW.user, OLD.delivered, OLD.read, NEW.delivered, NEW.read);
END;
"""


class _FaultyConnection:
    """The writer's connection with one error armed for the next batch: at
    ``BEGIN``, at the ``countdown``-th statement inside it, or at ``COMMIT``
    (an ``inside`` error of a batch with fewer statements lands on ``COMMIT``)."""

    def __init__(self, conn: sqlite3.Connection, step: str, countdown: int, error: Exception) -> None:
        self._conn = conn
        self.step: str | None = step
        self.countdown = countdown
        self.error = error

    def _check(self, sql: str) -> None:
        step = self.step
        if step is None or sql == "ROLLBACK":
            return
        if sql.startswith("BEGIN"):
            hit = step == "begin"
        elif sql == "COMMIT":
            hit = True
        else:
            self.countdown -= 1
            hit = step == "inside" and self.countdown <= 0
        if hit:
            self.step = None
            raise self.error

    def execute(self, sql: str, *params: Any) -> sqlite3.Cursor:
        self._check(sql)
        return self._conn.execute(sql, *params)

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        self._check(sql)
        return self._conn.executemany(sql, rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def _quiet(future: asyncio.Future[Any]) -> None:
    future.add_done_callback(lambda f: f.cancelled() or f.exception())


class SimStore(SqliteStore):
    def __init__(
        self,
        rng: random.Random,
        on_event: Callable[[str, str, str], None] | None = None,
        commit_time: tuple[float, float] = (0.0002, 0.004),
        read_time: tuple[float, float] = (0.0001, 0.002),
    ) -> None:
        # read_time: from a read's snapshot to its answer (SLOW_READ while slow).
        super().__init__(":memory:")
        self.rng = rng
        self.on_event = on_event
        self.commit_time = commit_time
        self.read_time = read_time
        self.down = False
        self._failing: deque[str] = deque()  # the step at which each coming batch fails
        self._writer_crash: str | None = None  # before | after: the next batch's writer error
        self._reads_fail_until = -1.0
        self._slow_until = -1.0
        self._tag: str | None = None  # the user of the inbox read being started
        self._queued: deque[_Op] = deque()
        self._in_flight: list[_Op] | None = None
        self._commit_handle: asyncio.TimerHandle | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = _SameThread(loop, self._committed)  # type: ignore[assignment]
        self._wconn = sqlite3.connect(":memory:", isolation_level=None)
        self._migrate(self._wconn)
        self._wconn.executescript(WATCHES)

    async def close(self) -> None:
        if self._commit_handle is not None:
            self._commit_handle.cancel()
        if self._wconn is not None:
            self._wconn.close()
            self._wconn = None

    @property
    def connection(self) -> sqlite3.Connection:
        assert self._wconn is not None
        return self._wconn

    # -- the writer, on the virtual clock ------------------------------------

    def _submit(
        self,
        fn: Callable[[sqlite3.Connection], Any],
        stream: SendStream | None = None,
        key: tuple[str, ...] | None = None,
        args: list[int | None] | None = None,
        lazy: bool = False,
    ) -> asyncio.Future[Any]:
        assert self._loop is not None
        future = self._loop.create_future()
        self._queued.append(_Op(fn, future, stream, key, args))
        if lazy:
            # As SqliteStore: a lazy op (a receipt ack) rides with the next
            # commit, or starts one itself after LAZY_COMMIT_SECONDS.
            assert isinstance(self._loop, _SameThread)
            self._loop.loop.call_later(LAZY_COMMIT_SECONDS, self._start_if_idle)
        elif self._in_flight is None:
            self._start_batch()
        return future

    def _start_if_idle(self) -> None:
        if self._in_flight is None and self._queued:
            self._start_batch()

    def _start_batch(self) -> None:
        batch = [self._queued.popleft() for _ in range(min(self.max_batch, len(self._queued)))]
        self._in_flight = batch
        assert isinstance(self._loop, _SameThread)
        self._commit_handle = self._loop.loop.call_later(
            self.rng.uniform(*self.commit_time), self._commit, batch
        )

    def _commit(self, batch: list[_Op]) -> None:
        self._commit_handle = None
        self._in_flight = None
        conn: Any = self.connection
        step = "begin" if self.down else self._failing.popleft() if self._failing else None
        crash, self._writer_crash = self._writer_crash, None
        if step is not None:
            error = sqlite3.OperationalError("simulated I/O error" if not self.down else "database is down")
            conn = _FaultyConnection(conn, step, self.rng.randint(1, 6), error)
        elif crash == "after":
            assert isinstance(self._loop, _SameThread)
            self._loop.lose_answer = True
        if crash == "before" and step is None:
            # What the production guard does when _run_batch raises before its
            # BEGIN (in _merge_cumulative): nothing ran, the callers are failed.
            self._batch_crashed(conn, batch, RuntimeError("simulated writer crash before BEGIN"))
        else:
            # The production writer's own guard: whatever escapes the batch
            # fails its callers, and the writer goes on.
            self._run_batch_or_fail(conn, batch)
        if step is not None:
            self._emit("commit-failed", f"{len(batch)} ops rolled back (I/O error at {step})")
        elif crash is not None:
            what = "rolled back" if crash == "before" else "committed, answers lost"
            self._emit("writer-crash", f"{len(batch)} ops {what}")
        if self._queued:
            self._start_batch()

    def _committed(self, results: list[tuple[bool, Any]]) -> None:
        seen: set[int] = set()  # folded acks share one result
        for ok, value in results:
            if not ok or id(value) in seen:
                continue
            seen.add(id(value))
            if isinstance(value, StoredMessage) and not value.duplicate:
                sender = value.sender or "(system)"
                self._emit("commit", f"{value.conv}#{value.seq} id={value.client_id} from={sender}")
            elif isinstance(value, GroupSnapshot) and value.event is not None:
                self._emit("commit", f"{value.group}#{value.event.seq} membership change")
            elif isinstance(value, MarkResult) and value.receipts:
                receipts = ", ".join(sorted(f"{r.user} rv={r.rv}" for r in value.receipts))
                self._emit(
                    "commit",
                    f"marks {value.conv} {value.user}={value.delivered}/{value.read} receipts for {receipts}",
                )

    def connection_future(self) -> asyncio.Future[Any]:
        assert self._loop is not None
        future = self._loop.create_future()
        _quiet(future)
        return future

    # -- reads ---------------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        tag, self._tag = self._tag, None
        loop = asyncio.get_running_loop()
        await asyncio.sleep(self.rng.uniform(*READ_WAIT))
        if self.down or (loop.time() < self._reads_fail_until and self.rng.random() < 0.5):
            raise StoreUnavailable("storage error: simulated I/O error (read)")
        # The snapshot: what was committed by now. The answer comes back
        # later, and commits (and their pushes) made meanwhile are not in it.
        result = fn(self.connection)
        delay = self.rng.uniform(*(SLOW_READ if loop.time() < self._slow_until else self.read_time))
        if tag is not None:
            owed = ", ".join(f"{e.conv} after {e.delivered}" for e in result) or "nothing"
            self._emit("inbox-read", f"{owed} (answer in {delay * 1000:.1f} ms)", who=tag)
        elif isinstance(result, dict):  # connect-time reads of one loop pass (connect_state)
            for user, state in result.items():
                if isinstance(state, ConnectState):
                    owed = ", ".join(f"{e.conv} after {e.delivered}" for e in state.inbox) or "nothing"
                    self._emit("inbox-read", f"{owed} (answer in {delay * 1000:.1f} ms)", who=user)
        await asyncio.sleep(delay)
        return result

    async def inbox(self, user: str) -> list[InboxEntry]:
        self._tag = user  # picked up by _read before its first wait
        return await super().inbox(user)

    # -- faults --------------------------------------------------------------

    def fail_batches(self, steps: list[str]) -> None:
        """The next ``len(steps)`` batches fail, each at its step of STORE_FAIL_STEPS."""
        self._failing.extend(steps)

    def writer_crash(self, step: str) -> None:
        """The next batch's writer hits an unexpected error ``before`` or ``after`` COMMIT."""
        self._writer_crash = step

    def fail_reads(self, seconds: float) -> None:
        self._reads_fail_until = asyncio.get_running_loop().time() + seconds

    def slow_reads(self, seconds: float) -> None:
        self._slow_until = asyncio.get_running_loop().time() + seconds

    def crash(self, after_commit: bool) -> None:
        """The database dies; what was committed stays, callers see a broken connection."""
        if self._commit_handle is not None:
            self._commit_handle.cancel()
            self._commit_handle = None
        batch, self._in_flight = self._in_flight or [], None
        waiting = [*batch, *self._queued]
        self._queued.clear()
        if batch and after_commit:
            # On disk, but the answer never left: run it with futures nobody reads.
            shadow = [_Op(op.fn, self.connection_future(), op.stream, op.key, op.args) for op in batch]
            self._run_batch(self.connection, shadow)
        self._emit("store-crash", f"{len(batch)} ops {'committed' if after_commit else 'lost'}")
        self.down = True
        failure = StoreUnavailable("storage error: connection to the database lost")
        for op in waiting:
            if op.stream is not None:
                op.stream.broken = True
            if not op.future.done():
                op.future.set_exception(failure)
        # The writer cache belonged to the dead process.
        self._convs.clear()
        self._batch_receipts.clear()

    def restart(self) -> None:
        self.down = False
        self._failing.clear()  # the failures were of the dead process
        self._convs.clear()
        self._emit("store-up", "")

    def _emit(self, kind: str, detail: str, who: str = "store") -> None:
        if self.on_event is not None:
            self.on_event(kind, who, detail)

    def broken_rules(self) -> list[tuple[str, str, int, str]]:
        """(kind, conv, seq, detail) for what the committed tables must never hold:
        marks that went backwards, one client id stored twice in a conversation."""
        found: list[tuple[str, str, int, str]] = []
        conn = self.connection
        for conv, user, old_d, old_r, new_d, new_r in conn.execute("SELECT * FROM sim_marks_backwards"):
            detail = f"{user}'s marks went back from {old_d}/{old_r} to {new_d}/{new_r}"
            found.append(("mark_backwards", conv, new_d, detail))
        for conv, sender, client_id, seqs in conn.execute(
            "SELECT conv, sender, client_id, group_concat(seq) FROM messages"
            " GROUP BY conv, sender, client_id HAVING COUNT(*) > 1 ORDER BY conv, client_id"
        ):
            first = int(seqs.split(",")[0])
            found.append(("duplicate", conv, first, f"{client_id!r} from {sender} stored at seqs {seqs}"))
        return found

    def membership(self) -> dict[str, dict[str, tuple[int, int | None]]]:
        """conv -> user -> (joined, left) for groups, as committed (for the checker)."""
        out: dict[str, dict[str, tuple[int, int | None]]] = {}
        with contextlib.closing(self.connection.cursor()) as cur:
            rows = cur.execute(
                "SELECT m.conv, m.user, m.joined_seq, m.left_seq FROM members m"
                " JOIN conversations c ON c.id = m.conv WHERE c.kind = 'group' ORDER BY m.conv, m.user"
            ).fetchall()
        for conv, user, joined, left in rows:
            out.setdefault(conv, {})[user] = (joined, left)
        return out
