"""The key directory: ``keys_put``, ``keys_count``, ``keys_get`` and ``keys_low``.

The server stores each device's public keys and hands out prekey bundles; it
never sees a private key. Everything here is off the message path: a send
never touches these tables, and a connect costs one key-stock read (batched
per loop pass on PostgreSQL), answered after the inbox is offered.

* ``keys_put`` only ever writes the authenticated user's own keys (the frame
  has no user field). Its signatures (~0.1 ms each, up to 101 per frame) are
  checked on one worker thread, not the event loop (libsodium releases the
  GIL), then the store writes the upload whole or refuses it whole.
* ``keys_get`` is rate-limited (draining someone's one-time keys is an
  attack): token buckets on this gateway per requester and target (10, then
  one a minute) and per requester (1,100, then 5 a second: a whole group's
  sessions at once).
* ``keys_low`` goes to the owner wherever it is connected (the registry
  routes it like a typing frame) when a fetch leaves fewer than
  ``LOW_WATER`` one-time keys of a kind, and after welcome when it has few
  or none.

A connection's key frames are answered in the order they came.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from roost.core.prekeys import check_upload, is_low
from roost.core.ratelimit import TokenBucket
from roost.protocol import frames as f
from roost.protocol.codec import encode
from roost.protocol.errors import ErrorCode, ProtocolError
from roost.registry.base import Registry
from roost.service.session import Session
from roost.store.base import DeviceKeys, KeyStock, KeyUpload, Store, StoreUnavailable

log = logging.getLogger("roost.keys")

MAX_BUCKETS = 10_000  # requesters remembered before idle (full) buckets are dropped


@dataclass(slots=True)
class KeyLimits:
    # Per requester and target user: draining one user's one-time keys takes
    # many fetches of that user, while a device fetches a user's bundle once
    # per session it starts (a first message, a retry, a reinstall).
    pair_rate: float = 1 / 60  # one more a minute
    pair_burst: float = 10.0
    # Per requester, all targets: a sender key for a group of 1,024 needs a
    # session with every member, so one burst covers a whole group.
    fetch_rate: float = 5.0
    fetch_burst: float = 1100.0
    upload_rate: float = 1 / 6  # keys_put per second per user (10 a minute)
    upload_burst: float = 20.0


class _Buckets:
    """A token bucket per user, forgotten once it is full again (idle)."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, TokenBucket] = {}

    def allow(self, user: str, now: float) -> bool:
        if self.rate <= 0:
            return True
        bucket = self._buckets.get(user)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._prune(now)
            bucket = self._buckets[user] = TokenBucket(self.rate, self.burst, now)
        return bucket.take(now) == 0.0

    def _prune(self, now: float) -> None:
        full = [u for u, b in self._buckets.items() if b.tokens + (now - b.updated) * b.rate >= b.burst]
        for user in full:
            del self._buckets[user]


def _error(exc: ProtocolError, ref: str) -> bytes:
    return encode(f.Error(code=exc.code.value, message=exc.message, ref=exc.ref or ref))


def _upload(user: str, frame: f.KeysPut) -> KeyUpload:
    last = frame.last_resort
    return KeyUpload(
        user,
        frame.device,
        frame.registration,
        frame.identity,
        (frame.signed.id, frame.signed.key, frame.signed.sig),
        [(p.id, p.key) for p in frame.prekeys],
        [(k.id, k.key, k.sig) for k in frame.kem_prekeys],
        None if last is None else (last.id, last.key, last.sig),
    )


def _bundle(owner: str, devices: list[DeviceKeys], ref: str) -> f.KeysBundle:
    return f.KeysBundle(
        user=owner,
        # Every device of an account shares its identity key; device 1 comes first.
        identity=devices[0].identity,
        devices=[
            f.DeviceKeys(
                device=d.device,
                registration=d.registration,
                signed=f.SignedPreKey(*d.signed),
                prekey=None if d.prekey is None else f.PreKey(*d.prekey),
                kem=f.KemPreKey(*d.kem),
                kem_last_resort=d.kem_last_resort,
            )
            for d in devices
        ],
        ref=ref,
    )


class KeyDirectory:
    def __init__(
        self,
        store: Store,
        registry: Registry,
        limits: KeyLimits,
        spawn: Callable[[Awaitable[Any]], None],
    ) -> None:
        self.store = store
        self.registry = registry
        self._spawn = spawn
        self._fetches = _Buckets(limits.fetch_rate, limits.fetch_burst)
        self._pair_fetches = _Buckets(limits.pair_rate, limits.pair_burst)
        self._uploads = _Buckets(limits.upload_rate, limits.upload_burst)
        # One thread: a flood of uploads costs at most one core's worth.
        self._verifier = ThreadPoolExecutor(1, thread_name_prefix="roost-keys")

    def stop(self) -> None:
        self._verifier.shutdown(wait=False, cancel_futures=True)

    # -- frames (called by ChatService.handle; a raised ProtocolError becomes an error frame) --

    def on_put(self, session: Session, frame: f.KeysPut) -> None:
        if not self._uploads.allow(session.user, time.monotonic()):
            raise ProtocolError(
                ErrorCode.RATE_LIMITED, "too many key uploads; retry in a few seconds", frame.ref
            )
        self._in_order(session, frame.ref, lambda: self._put(session, frame))

    def on_count(self, session: Session, frame: f.KeysCount) -> None:
        self._in_order(session, frame.ref, lambda: self._count(session, frame))

    def on_get(self, session: Session, frame: f.KeysGet) -> None:
        # Charged when asked, answered or not: a refusal costs the asker too.
        now = time.monotonic()
        if not self._pair_fetches.allow(f"{session.user}\0{frame.user}", now):
            raise ProtocolError(
                ErrorCode.RATE_LIMITED, f"too many fetches of {frame.user}'s keys; retry later", frame.ref
            )
        if not self._fetches.allow(session.user, now):
            raise ProtocolError(ErrorCode.RATE_LIMITED, "too many key bundle fetches; retry later", frame.ref)
        self._in_order(session, frame.ref, lambda: self._get(session, frame))

    async def after_connect(self, session: Session, e2ee: bool) -> None:
        """Tell a device with few one-time keys to upload (after welcome), and
        one with none at all if it keeps end-to-end keys (``e2ee`` in its auth)."""
        try:
            stock = await self.store.key_stock(session.user, 1)
        except StoreUnavailable as exc:
            log.info("key stock of %s unknown at connect: %s", session.user, exc)
            return
        self.tell_if_low(session, e2ee, stock)

    def tell_if_low(self, session: Session, e2ee: bool, stock: KeyStock) -> None:
        """``after_connect`` with device 1's stock already read (``Store.connect_state``)."""
        if (e2ee and not stock.has_identity) or (stock.has_identity and is_low(stock.ec, stock.kem)):
            session.push_frame(encode(f.KeysLow(device=1, ec=stock.ec, kem=stock.kem)))

    # -- the work, in order per connection -----------------------------------------

    def _in_order(self, session: Session, ref: str, work: Callable[[], Awaitable[None]]) -> None:
        previous = session.keys_work

        async def run() -> None:
            if previous is not None and not previous.done():
                await asyncio.wait([previous])
            try:
                await work()
            except ProtocolError as exc:
                session.push_frame(_error(exc, ref))
            except StoreUnavailable as exc:
                session.push_frame(_error(ProtocolError(ErrorCode.UNAVAILABLE, str(exc)), ref))
            except Exception:
                log.exception("key request of %s failed", session.user)
                session.push_frame(_error(ProtocolError(ErrorCode.INTERNAL, "internal error"), ref))

        task = asyncio.ensure_future(run())
        session.keys_work = task
        self._spawn(task)

    async def _put(self, session: Session, frame: f.KeysPut) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._verifier, check_upload, frame)
        stock = await self.store.put_keys(_upload(session.user, frame))
        session.push_frame(encode(f.KeysState(ec=stock.ec, kem=stock.kem, has_identity=True, ref=frame.ref)))

    async def _count(self, session: Session, frame: f.KeysCount) -> None:
        stock = await self.store.key_stock(session.user, frame.device)
        session.push_frame(
            encode(f.KeysState(ec=stock.ec, kem=stock.kem, has_identity=stock.has_identity, ref=frame.ref))
        )

    async def _get(self, session: Session, frame: f.KeysGet) -> None:
        devices = await self.store.take_keys(frame.user)
        session.push_frame(encode(_bundle(frame.user, devices, frame.ref)))
        for d in devices:
            if is_low(d.ec_left, d.kem_left):
                # Wherever the owner is connected (another gateway in a cluster);
                # dropped if it is offline: it hears after its next welcome.
                low = encode(f.KeysLow(device=d.device, ec=d.ec_left, kem=d.kem_left))
                self.registry.push_frame([frame.user], low)
