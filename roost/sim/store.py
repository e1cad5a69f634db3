"""The production SQLite store, driven on the simulator's clock.

The simulator runs the real ``SqliteStore`` code (its schema, the operation
closures, ``_run_batch`` with its ack folding, receipts and failure path) on
one in-memory SQLite connection, so the store semantics under test are
exactly the embedded store's. What is replaced is only the threading: the
writer thread becomes a task-free scheduler on the virtual clock (a batch
takes everything queued, "fsyncs" for a seeded time, then runs and commits),
and reads run on the same connection after a seeded delay. An in-memory
model of the store would be faster but would have to re-implement, and could
drift from, the semantics it is meant to check.

Faults, each decided from the run's seed:

* ``fail_batches(n)``: the next ``n`` batches fail before commit (an I/O
  error): the real failure path rolls back, drops the writer cache and
  breaks the send streams; nothing of them is committed.
* ``crash(after_commit)``: the database process dies. The batch on disk is
  committed or not; every caller still waiting gets ``StoreUnavailable``
  (the connection broke), including the one whose batch did commit. The
  store stays down (every batch fails, reads fail) until ``restart``, which
  comes back with exactly what was committed (the writer cache is rebuilt
  from the tables).
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

    def call_soon_threadsafe(self, resolve: Callable[..., None], batch: Any, results: list[Any]) -> None:
        self._committed(results)
        self.loop.call_soon(resolve, batch, results)


def _io_error(conn: sqlite3.Connection) -> None:
    raise sqlite3.OperationalError("simulated I/O error")


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
        super().__init__(":memory:")
        self.rng = rng
        self.on_event = on_event
        self.commit_time = commit_time
        self.read_time = read_time
        self.down = False
        self._failing = 0
        self._queued: deque[_Op] = deque()
        self._in_flight: list[_Op] | None = None
        self._commit_handle: asyncio.TimerHandle | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = _SameThread(loop, self._committed)  # type: ignore[assignment]
        self._wconn = sqlite3.connect(":memory:", isolation_level=None)
        self._migrate(self._wconn)

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
        failing = self.down or self._failing > 0
        if failing and not self.down:
            self._failing -= 1
        if failing:
            # The real failure path: the operations ran, then the commit hits
            # a storage error and everything rolls back.
            poison = _Op(_io_error, self.connection_future())
            self._run_batch(self.connection, [*batch, poison])
        else:
            self._run_batch(self.connection, batch)
        if failing:
            self._emit("commit-failed", f"{len(batch)} ops rolled back")
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
        # The read sees the state at its end (so the trace shows when its
        # snapshot was taken); commits made meanwhile are not in it.
        await asyncio.sleep(self.rng.uniform(*self.read_time))
        if self.down:
            raise StoreUnavailable("storage error: database is down")
        return fn(self.connection)

    async def inbox(self, user: str) -> list[InboxEntry]:
        entries = await super().inbox(user)
        owed = ", ".join(f"{e.conv} after {e.delivered}" for e in entries) or "nothing"
        self._emit("inbox-read", owed, who=user)
        return entries

    # -- faults --------------------------------------------------------------

    def fail_batches(self, count: int) -> None:
        self._failing += count

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
        self._convs.clear()
        self._emit("store-up", "")

    def _emit(self, kind: str, detail: str, who: str = "store") -> None:
        if self.on_event is not None:
            self.on_event(kind, who, detail)

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
