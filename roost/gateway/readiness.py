"""``/readyz``: may a load balancer send this gateway new connections?

Ready while the store answers, in cluster mode Redis answers too, and the
gateway is not draining. The store and Redis checks are one cheap round trip
each, cached for ``ttl`` seconds and shared by concurrent requests, so a load
balancer polling every few hundred milliseconds costs next to nothing.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

# A token hash no user has: a real indexed read through the store's read path.
_PROBE_TOKEN = b"roost-readiness-probe"


class Readiness:
    def __init__(self, store: Any, registry: Any, cluster: bool, ttl: float = 1.0, timeout: float = 2.0):
        self.store = store
        self.registry = registry
        self.cluster = cluster
        self.ttl = ttl
        self.timeout = timeout
        self._checked_at = float("-inf")
        self._reason: str | None = None
        self._running: asyncio.Future[str | None] | None = None

    async def reason(self) -> str | None:
        """None when the dependencies answered within the last ``ttl`` seconds, else why not."""
        if time.monotonic() - self._checked_at < self.ttl:
            return self._reason
        if self._running is None:
            self._running = asyncio.ensure_future(self._check())
        running = self._running
        try:
            return await asyncio.shield(running)
        finally:
            if self._running is running and running.done():
                self._running = None

    async def _check(self) -> str | None:
        reason = await self._probe()
        self._reason, self._checked_at = reason, time.monotonic()
        return reason

    async def _probe(self) -> str | None:
        try:
            async with asyncio.timeout(self.timeout):
                await self.store.user_by_token(_PROBE_TOKEN)
        except TimeoutError:
            return f"store did not answer within {self.timeout:g} s"
        except Exception as exc:
            return f"store unavailable: {exc}"
        if self.cluster:
            try:
                async with asyncio.timeout(self.timeout):
                    await self.registry.ping()
            except TimeoutError:
                return f"redis did not answer within {self.timeout:g} s"
            except Exception as exc:
                return f"redis unavailable: {exc}"
        return None
