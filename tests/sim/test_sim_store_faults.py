"""The simulator's store faults do what docs/simulation.md says: an I/O error
at BEGIN, inside the batch or at COMMIT leaves nothing durable and fails
every caller; a writer crash after COMMIT leaves the batch durable and still
fails every caller; a read answers with its snapshot even when commits land
while the answer travels; failing reads raise ``StoreUnavailable``."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from typing import Any

import pytest

from roost.sim.loop import VirtualClockLoop
from roost.sim.store import STORE_FAIL_STEPS, SimStore
from roost.store.base import SendStream, StoreUnavailable

AB = "d:ann:ben"


class Harness:
    def __init__(self) -> None:
        self.loop = VirtualClockLoop()
        self.store = SimStore(random.Random(0))
        self.run(self.store.open())
        for user in ("ann", "ben"):
            self.run(self.store.add_user(user, user.encode(), 0))
        self.run(self.send("m0"))  # the conversation exists: seq 1

    def run(self, awaitable: Any) -> Any:
        return self.loop.run_until_complete(awaitable)

    def send(self, client_id: str, stream: SendStream | None = None) -> Any:
        return self.store.append("ann", client_id, "text/plain", b"x", 0, to="ben", stream=stream)

    def messages(self) -> list[tuple[int, str]]:
        rows = self.store.connection.execute("SELECT seq, client_id FROM messages ORDER BY seq")
        return [tuple(row) for row in rows]

    def answer(self, future: Any) -> Any:
        """The result, or the exception, of a store future."""

        async def wait() -> Any:
            try:
                return await future
            except StoreUnavailable as exc:
                return exc

        return self.run(wait())


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.run(h.store.close())
    h.loop.close()


@pytest.mark.parametrize("step", STORE_FAIL_STEPS)
def test_an_io_error_at_any_step_commits_nothing_and_fails_every_caller(harness: Harness, step: str) -> None:
    # The first write starts a batch at once; the next two wait for the second.
    harness.store.fail_batches([step, step])
    stream = SendStream()
    first, second = harness.send("m1", stream), harness.send("m2", stream)
    mark = harness.store.advance_marks("ben", AB, 1, None)
    for future in (first, second, mark):
        assert isinstance(harness.answer(future), StoreUnavailable)
    assert stream.broken
    assert harness.messages() == [(1, "m0")]
    delivered = "SELECT delivered FROM members WHERE user='ben'"
    assert harness.store.connection.execute(delivered).fetchone()[0] == 0
    # The next batch works, with no seq skipped.
    assert harness.answer(harness.send("m1")).seq == 2


def test_the_commit_step_fails_after_every_statement_ran(harness: Harness) -> None:
    statements: list[str] = []
    connection = harness.store.connection
    connection.set_trace_callback(statements.append)
    harness.store.fail_batches(["commit"])
    assert isinstance(harness.answer(harness.send("m1")), StoreUnavailable)
    connection.set_trace_callback(None)
    assert any(s.startswith("INSERT INTO messages") for s in statements)
    assert statements[-1] == "ROLLBACK" and "COMMIT" not in statements


def test_a_writer_crash_after_commit_is_durable_but_answered_as_failed(harness: Harness) -> None:
    harness.store.writer_crash("after")
    stream = SendStream()
    assert isinstance(harness.answer(harness.send("m1", stream)), StoreUnavailable)
    assert stream.broken  # later sends of that connection cannot overtake its resend
    assert harness.messages() == [(1, "m0"), (2, "m1")]
    retry = harness.answer(harness.send("m1"))
    assert (retry.seq, retry.duplicate) == (2, True)


def test_a_writer_crash_before_begin_commits_nothing(harness: Harness) -> None:
    harness.store.writer_crash("before")
    assert isinstance(harness.answer(harness.send("m1")), StoreUnavailable)
    assert harness.messages() == [(1, "m0")]
    assert harness.answer(harness.send("m1")).seq == 2


def test_a_read_answers_with_its_snapshot_while_commits_race_it(harness: Harness) -> None:
    async def race() -> tuple[Any, Any]:
        harness.store.slow_reads(10.0)
        read = asyncio.ensure_future(harness.store.inbox("ben"))
        await asyncio.sleep(0.001)  # the read has taken its snapshot, its answer is on the way
        stored = await harness.send("m1")
        return stored, await read

    stored, entries = harness.run(race())
    assert stored.seq == 2
    [entry] = entries
    assert entry.upto == 1  # the message committed meanwhile is not in the answer


def test_failing_reads_raise_store_unavailable(harness: Harness) -> None:
    async def reads() -> list[bool]:
        harness.store.fail_reads(10.0)
        outcomes = []
        for _ in range(20):
            try:
                await harness.store.inbox("ben")
                outcomes.append(True)
            except StoreUnavailable:
                outcomes.append(False)
        return outcomes

    outcomes = harness.run(reads())
    assert not all(outcomes) and any(outcomes)  # about half fail
