"""CPU per 1:1 message of the embedded store alone, without the gateway.

``python -m roost.bench.store_cost [--pairs P] [--rounds R] [--warmup W]``
opens a ``SqliteStore`` in a temporary directory, creates 2P users, and runs
rounds of the store operations one delivered and read 1:1 message makes:
every pair's sender appends one message, every recipient advances its
delivered and read marks to it, every sender acks the receipt that made.
Each round's operations are submitted in one loop pass, as a loaded
gateway submits them, so they share commits. After W warm-up rounds it
prints one JSON line: the process's CPU µs per message over the R measured
rounds, commits, operations per commit.

The figure excludes WebSockets, decoding and the service, and includes the
asyncio bookkeeping of this driver. For instruction counts (repeatable on a
shared machine), run it under ``valgrind --tool=callgrind`` twice with
different ``--rounds`` and divide the difference of the totals by the
difference in messages (docs/performance.md, "Change 4").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from roost.store.sqlite import SqliteStore, database_path

NOW = 1_700_000_000_000
BODY = b"x" * 64


async def _round(store: SqliteStore, users: list[str], n: int) -> None:
    pairs = range(len(users) // 2)
    sent = await asyncio.gather(
        *(store.append(users[2 * p], f"m{n}", "text/plain", BODY, NOW, to=users[2 * p + 1]) for p in pairs)
    )
    marked = await asyncio.gather(
        *(
            store.advance_marks(users[2 * p + 1], m.conv, m.seq, m.seq)
            for p, m in zip(pairs, sent, strict=True)
        )
    )
    await asyncio.gather(*(store.ack_receipts(r.user, r.conv, r.rv) for m in marked for r in m.receipts))


async def measure(pairs: int, rounds: int, warmup: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="roost-store-cost-") as tmp:
        store = SqliteStore(database_path(Path(tmp)))
        await store.open()
        try:
            users = [f"u{i}" for i in range(2 * pairs)]
            await asyncio.gather(*(store.add_user(u, u.encode(), NOW) for u in users))
            for n in range(warmup):
                await _round(store, users, n)
            commits, ops = store.commits, store.committed_ops
            cpu = time.process_time()
            for n in range(warmup, warmup + rounds):
                await _round(store, users, n)
            cpu = time.process_time() - cpu
            messages = pairs * rounds
            return {
                "messages": messages,
                "cpu_us_per_message": round(cpu * 1e6 / messages, 1),
                "commits": store.commits - commits,
                "ops_per_commit": round((store.committed_ops - ops) / max(store.commits - commits, 1), 1),
            }
        finally:
            await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m roost.bench.store_cost", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args.pairs, args.rounds, args.warmup))))


if __name__ == "__main__":
    main()
