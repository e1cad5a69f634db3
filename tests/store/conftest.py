"""Store fixtures, for every store implementation.

The behavioural tests (``test_sqlite.py``) ask for ``store``, ``harness`` and
``gate``; which store they get depends on the ``backend`` fixture: "sqlite"
here, overridden to "postgres" by ``test_postgres.py``, which runs the same
tests against a throwaway PostgreSQL (``pg.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import pytest

from roost.devcluster.postgres import PgServer, PgUnavailable
from roost.store.sqlite import SqliteStore

if TYPE_CHECKING:
    from roost.store.postgres import PostgresStore

    AnyStore: TypeAlias = SqliteStore | PostgresStore

USERS = ("alice", "bob", "carol", "dave", "erin")
NOW = 1_700_000_000_000


def token_hash(name: str) -> bytes:
    return hashlib.sha256(f"token-of-{name}".encode()).digest()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "roost.sqlite"


@pytest.fixture
def backend() -> str:
    """Which store the behavioural tests run against (overridden per module)."""
    return "sqlite"


# -- gates: hold the writer so that writes submitted meanwhile share one batch ------------


class WriterGate:
    """Holds the writer thread inside a commit, so every write submitted while
    the gate is closed lands in one and the same next batch."""

    own_commits = 1  # the held operation commits a transaction of its own

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        self.started = threading.Event()
        self.release = threading.Event()
        self.future: asyncio.Future[Any] | None = None

    async def __aenter__(self) -> WriterGate:
        def hold(_conn: Any) -> None:
            self.started.set()
            self.release.wait(10)

        self.future = self.store._submit(hold)
        assert await asyncio.to_thread(self.started.wait, 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        assert self.future is not None
        await self.future


class PgWriterGate:
    """The same for PostgresStore: its batching task waits between two batches."""

    own_commits = 0

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.future: asyncio.Future[Any] | None = None

    async def __aenter__(self) -> PgWriterGate:
        async def hold() -> None:
            self.started.set()
            await asyncio.wait_for(self.release.wait(), 10)

        self.future = self.store._submit_call(hold)
        await asyncio.wait_for(self.started.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        assert self.future is not None
        await self.future


# -- harnesses: what a test needs to know about one store implementation ---------------


class SqliteHarness:
    name = "sqlite"
    user_column = "user"

    def __init__(self, path: Path) -> None:
        self.path = path

    def make(self, **kwargs: Any) -> SqliteStore:
        """A new, unopened store on this test's database."""
        return SqliteStore(self.path, **kwargs)

    async def scalar(self, sql: str, *args: Any) -> Any:
        conn = sqlite3.connect(self.path)
        try:
            return conn.execute(sql, args).fetchone()[0]
        finally:
            conn.close()

    def gate(self, store: Any) -> WriterGate:
        return WriterGate(store)

    @contextlib.contextmanager
    def failing_appends(self, store: Any, client_id: str) -> Iterator[None]:
        """While active, a batch holding an append with ``client_id`` fails in storage."""
        real_insert = store._insert_message

        def flaky_insert(conn: sqlite3.Connection, state: Any, sender: str, cid: str, *rest: Any) -> Any:
            if cid == client_id:
                raise sqlite3.OperationalError("disk I/O error")
            return real_insert(conn, state, sender, cid, *rest)

        store._insert_message = flaky_insert
        try:
            yield
        finally:
            del store._insert_message


class PgHarness:
    name = "postgres"
    user_column = "user_name"

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def make(self, **kwargs: Any) -> PostgresStore:
        from roost.store.postgres import PostgresStore

        return PostgresStore(self.dsn, **kwargs)

    async def scalar(self, sql: str, *args: Any) -> Any:
        import asyncpg

        numbered = itertools.count(1)
        sql = re.sub(r"\?", lambda _: f"${next(numbered)}", sql)
        conn = await asyncpg.connect(self.dsn)
        try:
            return await conn.fetchval(sql, *args)
        finally:
            await conn.close()

    def gate(self, store: Any) -> PgWriterGate:
        return PgWriterGate(store)

    @contextlib.contextmanager
    def failing_appends(self, store: Any, client_id: str) -> Iterator[None]:
        """While active, an append with ``client_id`` raises inside PostgreSQL,
        which aborts its whole batch."""
        real_args = store._append_args

        def flaky_args(sender: str, conv: str, to: str | None, cid: str, *rest: Any) -> Any:
            args = real_args(sender, conv, to, cid, *rest)
            return ("explode", *args[1:]) if cid == client_id else args

        store._append_args = flaky_args
        try:
            yield
        finally:
            del store._append_args


Harness: TypeAlias = SqliteHarness | PgHarness


@pytest.fixture
def harness(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Harness:
    if backend == "sqlite":
        return SqliteHarness(tmp_path / "roost.sqlite")
    return PgHarness(request.getfixturevalue("pg_database"))


@pytest.fixture
async def store(harness: Harness) -> AsyncIterator[AnyStore]:
    s = harness.make()
    await s.open()
    for name in USERS:
        await s.add_user(name, token_hash(name), NOW)
    yield s
    await s.close()


@pytest.fixture
def gate(store: AnyStore, harness: Harness) -> Callable[[], Any]:
    """``async with gate(): ...`` -- writes submitted in the body commit as one batch."""
    return lambda: harness.gate(store)


# -- a throwaway PostgreSQL --------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One PostgreSQL for the session (skipped with the reason if there are no binaries)."""
    try:
        server = PgServer()
    except PgUnavailable as exc:
        pytest.skip(str(exc))
    try:
        server.start()
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def pg_dsn(pg_server: PgServer) -> str:
    """The DSN of the throwaway server's maintenance database."""
    return pg_server.dsn()


_databases = itertools.count(1)
_shared: dict[str, str] = {}  # server root -> name of the migrated database tests share


async def _create_database(server: PgServer) -> str:
    import asyncpg

    name = f"roost_test_{next(_databases)}"
    conn = await asyncpg.connect(server.dsn())
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    return name


@pytest.fixture
async def pg_database(pg_server: PgServer) -> str:
    """A migrated database with no data in it, for one test; its DSN.

    One database serves the session: each test starts by ending any session
    left on it and truncating every table (much cheaper than CREATE DATABASE
    with fsync on). Tests that need a database nobody touched (migrations) or
    change its settings use ``pg_empty_database``."""
    import asyncpg

    from roost.store.postgres import migrate

    key = str(pg_server.root)
    if key not in _shared:
        name = await _create_database(pg_server)
        await migrate(pg_server.dsn(name))
        _shared[key] = name
        return pg_server.dsn(name)
    name = _shared[key]
    conn = await asyncpg.connect(pg_server.dsn(name))
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        tables = await conn.fetch(
            "SELECT quote_ident(tablename) FROM pg_tables"
            " WHERE schemaname = current_schema() AND tablename <> 'roost_schema'"
        )
        await conn.execute(f"TRUNCATE {', '.join(t[0] for t in tables)}")
    finally:
        await conn.close()
    return pg_server.dsn(name)


@pytest.fixture
async def pg_empty_database(pg_server: PgServer) -> str:
    """A new database (CREATE DATABASE) without any schema. Not dropped: DROP
    DATABASE forces a checkpoint, and the whole server goes at the session end."""
    import asyncpg  # noqa: F401

    return pg_server.dsn(await _create_database(pg_server))
