"""A fixed 1:1 workload for counting a server's instructions (callgrind) or CPU.

``python -m roost.bench.closed_loop URL DATA_DIR [PAIRS] [ROUNDS]`` creates
2 x PAIRS users in the server's SQLite data dir, connects them, and runs
ROUNDS rounds after one warm-up round: in each, every sender sends one
message to its peer and the round ends when every ✓ and every push has
arrived (the recipients ``dack``, the senders ``rack`` their receipts, as
the SDK does). Closed loop, so the same messages and frames reach the server
whatever its speed: the count per message compares builds on a machine
whose other load makes wall-clock figures meaningless. It prints ``GO``
when the measured rounds start and ``DONE …`` when they end, so a caller
can start and stop its counters (``callgrind_control -i on`` / ``-d``, or
``/proc/PID/stat``) in between; docs/performance.md, "Issue 16", has the
commands.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import time

import aiohttp

from roost.protocol import frames as f
from roost.protocol.codec import decode_server, encode
from roost.store.accounts import add_users

ROUND_TIMEOUT = 900.0  # seconds; a server under callgrind is ~50x slower


async def run(url: str, data_dir: str, pairs: int, rounds: int) -> float:
    """Seconds the measured rounds took."""
    tag = secrets.token_hex(3)
    senders = [f"a{tag}{i}" for i in range(pairs)]
    peers = [f"b{tag}{i}" for i in range(pairs)]
    tokens = await add_users(data_dir, senders + peers)
    loop = asyncio.get_running_loop()
    waits: dict[tuple[str, str], asyncio.Future[None]] = {}

    def arrived(kind: str, user: str) -> None:
        fut = waits.pop((kind, user), None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def read(user: str, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            frame = decode_server(msg.data)
            if isinstance(frame, f.Deliver):
                await ws.send_str(encode(f.DeliveryAck(conv=frame.conv, seq=frame.seq)).decode())
                arrived("msg", user)
            elif isinstance(frame, f.SendAck):
                arrived("ack", user)
            elif isinstance(frame, f.Receipt):
                await ws.send_str(encode(f.ReceiptAck(conv=frame.conv, rv=frame.rv)).decode())

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        sockets: dict[str, aiohttp.ClientWebSocketResponse] = {}

        async def connect(user: str) -> None:
            ws = await http.ws_connect(url.rstrip("/") + "/v1/ws")
            await ws.send_str(encode(f.Auth(token=tokens[user])).decode())
            welcome = decode_server((await ws.receive()).data)
            assert isinstance(welcome, f.Welcome), welcome
            sockets[user] = ws

        await asyncio.gather(*(connect(u) for u in senders + peers))
        readers = [asyncio.create_task(read(u, ws)) for u, ws in sockets.items()]
        started = 0.0
        for r in range(rounds + 1):
            if r == 1:  # round 0 warms up (conversations created, caches filled)
                print("GO", flush=True)
                started = time.monotonic()
            futures = []
            for i, (sender, peer) in enumerate(zip(senders, peers, strict=True)):
                for key in (("ack", sender), ("msg", peer)):
                    futures.append(waits.setdefault(key, loop.create_future()))
                send = f.Send(id=f"{r}-{i}", body=b"x" * 64, to=peer)
                await sockets[sender].send_str(encode(send).decode())
            await asyncio.wait_for(asyncio.gather(*futures), ROUND_TIMEOUT)
        elapsed = time.monotonic() - started
        await asyncio.sleep(0.2)  # the last round's dacks and racks
        for task in readers:
            task.cancel()
        for ws in sockets.values():
            await ws.close()
    return elapsed


def main() -> None:
    url, data_dir = sys.argv[1], sys.argv[2]
    pairs = int(sys.argv[3]) if len(sys.argv) > 3 else 100
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 20
    elapsed = asyncio.run(run(url, data_dir, pairs, rounds))
    print(f"DONE {pairs * rounds} msgs in {elapsed:.2f}s", flush=True)


if __name__ == "__main__":
    main()
