"""Lookups made in one event-loop pass share one query.

In a reconnect storm thousands of devices authenticate and read their inbox
at the same moment; one round trip (and one pool checkout) each is what
exhausted the PostgreSQL pool. A :class:`PassBatcher` queues the keys asked
for during one pass of the loop and answers all of them from one fetch per
``chunk`` keys, scheduled with ``call_soon`` (so a lone request waits for
nothing but the end of the current pass).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from roost.store.base import StoreUnavailable

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class PassBatcher(Generic[K, V]):
    """``await get(key)``: the value ``fetch`` found for ``key``, or ``missing()``.

    Callers asking for the same key in one pass share the one answer object:
    treat it as read-only.
    """

    def __init__(
        self,
        fetch: Callable[[list[K]], Awaitable[dict[K, V]]],
        missing: Callable[[], V],
        chunk: int = 512,
    ) -> None:
        self._fetch = fetch
        self._missing = missing
        self._chunk = chunk
        self._waiting: dict[K, list[asyncio.Future[V]]] | None = None
        self._tasks: set[asyncio.Future[None]] = set()

    def get(self, key: K) -> asyncio.Future[V]:
        """A future of its own per caller (no coroutine, no shield: a login
        makes two of these): a caller that gives up cancels only its own."""
        loop = asyncio.get_running_loop()
        waiting = self._waiting
        if waiting is None:
            waiting = self._waiting = {}
            loop.call_soon(self._run)
        fut: asyncio.Future[V] = loop.create_future()
        callers = waiting.get(key)
        if callers is None:
            waiting[key] = [fut]
        else:
            callers.append(fut)
        return fut

    def _run(self) -> None:
        waiting, self._waiting = self._waiting or {}, None
        items = list(waiting.items())
        for start in range(0, len(items), self._chunk):
            task = asyncio.ensure_future(self._answer(dict(items[start : start + self._chunk])))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(self, chunk: dict[K, list[asyncio.Future[V]]]) -> None:
        try:
            found = await self._fetch(list(chunk))
        except BaseException as exc:
            for callers in chunk.values():
                for fut in callers:
                    if not fut.done():
                        fut.set_exception(
                            exc if isinstance(exc, Exception) else StoreUnavailable("cancelled")
                        )
                        fut.exception()  # a caller that gave up meanwhile is not an error to log
            if not isinstance(exc, Exception):
                raise
            return
        for key, callers in chunk.items():
            value = found[key] if key in found else self._missing()
            for fut in callers:
                if not fut.done():
                    fut.set_result(value)
