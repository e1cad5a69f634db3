"""The encryption pump never seals a newer message to a chat while an older
one to the same chat, left unsealed earlier in the same pass, still waits.

The case the simulator found (seeds 905 and 267): a direct message to bob
waits for bob's keys; a group message behind it fetches the group members'
keys, bob's among them, which opens the session mid-pass; the next direct
message to bob could then be sealed and sent before the first."""

from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace

from roost.client.crypto import E2ee
from roost.client.state import Outbox, OutboxItem

WAITING = "waiting for bob's encryption keys"


def item(ident: str, to: str | None = None, conv: str | None = None) -> OutboxItem:
    return OutboxItem(ident, to, conv, "text/plain", b"x", 0)


def pump_over(outbox: Outbox) -> tuple[E2ee, list[str]]:
    """An E2ee whose per-item step is the simulator's story: bob has no
    session until the group item's key fetch opens one."""
    sealed: list[str] = []
    bob_open = False
    pump = E2ee.__new__(E2ee)
    pump.client = SimpleNamespace(_outbox=outbox)  # type: ignore[assignment]

    async def pump_item(self: E2ee, it: OutboxItem, loop: asyncio.AbstractEventLoop) -> None:
        nonlocal bob_open
        if it.conv is not None:
            bob_open = True  # the group's key fetch brought bob's bundle
        elif not bob_open:
            outbox[it.id] = dataclasses.replace(it, pending=WAITING)
            return
        sealed.append(it.id)
        outbox[it.id] = dataclasses.replace(it, wire_ct="x", wire_body=b"x")

    def set_pending(self: E2ee, it: OutboxItem, reason: str) -> None:
        outbox[it.id] = dataclasses.replace(outbox[it.id], pending=reason)

    pump._pump_item = pump_item.__get__(pump)  # type: ignore[method-assign]
    pump._set_pending = set_pending.__get__(pump)  # type: ignore[method-assign]
    return pump, sealed


async def test_a_newer_message_waits_behind_an_older_one_blocked_in_the_same_pass() -> None:
    outbox = Outbox()
    for it in (item("bob-0", to="bob"), item("g-0", conv="g:1"), item("bob-1", to="bob")):
        outbox[it.id] = it
    pump, sealed = pump_over(outbox)
    await pump._pump_once()
    assert sealed == ["g-0"], "a newer message to bob went before the older one"
    assert outbox["bob-1"].pending == WAITING  # it says why it waits
    await pump._pump_once()  # the next pass: bob's session is open now
    assert sealed == ["g-0", "bob-0", "bob-1"]
