"""Prometheus metrics of one server: the objects, in one place.

Each gateway owns one ``Metrics`` (its own ``CollectorRegistry``), hands it
to its store and chat service, and serves it on ``/metrics`` of the admin
listener (``roost serve --admin-port``). Names follow Prometheus practice:
``roost_`` prefix, ``_total`` for counters, base units (``_seconds``).

Label values come from small fixed sets (frame types, close codes, reasons,
error kinds), never a user or conversation id. Hot paths use label children
resolved here once: ``labels()`` costs ~1.9 µs a call, ``inc()`` on a child
~0.34 µs. The counters a message moves several times (frames in and out,
deliveries, commits) are ``LoopCounter``s: a plain integer add on the event
loop, moved into the Prometheus child when the registry is collected.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import get_args

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

from roost.protocol.errors import CloseCode
from roost.protocol.frames import ServerFrame

# Seconds from a send frame's receipt to its ✓ being queued: group commit
# makes a few ms normal; the alert threshold is 0.5 s.
SEND_ACK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# Seconds to get a connection from the PostgreSQL pool: ~0 unless every
# connection is busy.
POOL_WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
POOLS = ("read", "write")
# Seconds of one Redis router round (at most two pipelined round trips).
ROUND_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

AUTH_FAILURE_REASONS = ("timeout", "bad_frame", "failed", "version", "unavailable")
STORE_ERROR_KINDS = ("commit_failed", "writer_failed")
DELIVERY_PATHS = ("push", "inbox")
# A server frame's JSON starts with its tag: b'{"type":"pong",...'.
FRAME_TAG_START = len(b'{"type":"')
# Close codes a peer may send are arbitrary integers: anything not Roost's
# own or a standard one is counted as "other" so the label set stays bounded.
KNOWN_CLOSE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1006, 1007, 1008, 1009, 1011}
    | {v for k, v in vars(CloseCode).items() if k.isupper() and isinstance(v, int)}
)


class LoopCounter:
    """A counter for the event loop's hot path: ``inc`` adds to a plain int
    (no lock, no calls into prometheus_client: ~10 updates per 1:1 message);
    every collection of the registry (a scrape, ``get_sample_value``) first
    moves what was added into the Prometheus counter, so the totals shown are
    the same. Only the event loop's thread may call ``inc``: ``+=`` on an
    attribute is not atomic between threads."""

    __slots__ = ("_flushed", "count", "counter")

    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self.count = 0
        self._flushed = 0  # written by flush() only

    def inc(self, amount: int = 1) -> None:
        self.count += amount

    def flush(self) -> None:
        count = self.count
        if count != self._flushed:
            self.counter.inc(count - self._flushed)
            self._flushed = count


class _FlushLoopCounters:
    """The registry's first collector: a collection starts by flushing every
    LoopCounter, then the counters themselves are collected as usual."""

    def __init__(self) -> None:
        self.counters: list[LoopCounter] = []
        self._lock = threading.Lock()  # two scrapes at once must not add twice

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            for counter in self.counters:
                counter.flush()
        return ()


class Metrics:
    """Every metric Roost exports, registered in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._loop_counters = _FlushLoopCounters()
        r.register(self._loop_counters)  # first: collections flush before they read
        self.connections_open = Gauge(
            "roost_connections_open", "WebSocket connections currently open", registry=r
        )
        self.connections_accepted = Counter(
            "roost_connections_accepted_total", "WebSocket upgrades accepted", registry=r
        )
        auth_failures = Counter(
            "roost_auth_failures_total", "Connections refused at authentication", ["reason"], registry=r
        )
        self.auth_failure = {reason: auth_failures.labels(reason) for reason in AUTH_FAILURE_REASONS}
        # Children resolved by the chat service for the frame types it handles.
        self.frames_in = Counter(
            "roost_frames_in_total", "Client frames handled after auth, by type", ["type"], registry=r
        )
        self.messages_committed = self.loop_counter(
            Counter(
                "roost_messages_committed_total",
                "Messages committed by the store (duplicates not counted)",
                registry=r,
            )
        )
        self.send_ack_seconds = Histogram(
            "roost_send_ack_seconds",
            "From a send frame's receipt to its ✓ being queued to the socket",
            buckets=SEND_ACK_BUCKETS,
            registry=r,
        )
        self.commit_batch_size = Histogram(
            "roost_store_commit_batch_size",
            "Operations in one store commit (group commit)",
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.commit_seconds = Histogram(
            "roost_store_commit_seconds",
            "Duration of one store commit batch",
            buckets=COMMIT_BUCKETS,
            registry=r,
        )
        deliveries = Counter(
            "roost_deliveries_total",
            "Messages sent to a device: pushed live or read from its inbox",
            ["path"],
            registry=r,
        )
        self.delivered_push = self.loop_counter(deliveries.labels("push"))
        self.delivered_inbox = self.loop_counter(deliveries.labels("inbox"))
        self._closes = Counter(
            "roost_connections_closed_total",
            "Closed WebSocket connections by close code",
            ["code"],
            registry=r,
        )
        self._close_children = {code: self._closes.labels(str(code)) for code in KNOWN_CLOSE_CODES}
        self._close_other = self._closes.labels("other")
        store_errors = Counter(
            "roost_store_errors_total", "Store batches that failed, by kind", ["kind"], registry=r
        )
        self.store_error = {kind: store_errors.labels(kind) for kind in STORE_ERROR_KINDS}
        # Set by the chat service: computed at scrape time, nothing on the hot path.
        self.inbox_drains_pending = Gauge(
            "roost_inbox_drains_pending",
            "Conversations whose messages wait in the inbox for a drain to a connected device",
            registry=r,
        )
        self.rate_limited = Counter(
            "roost_rate_limited_total",
            "Times a connection's reading was paused by its rate limit",
            registry=r,
        )

        frames_out = Counter(
            "roost_frames_out_total", "Server frames queued to a connection, by type", ["type"], registry=r
        )
        self.receipts = self.loop_counter(
            Counter("roost_receipts_total", "Receipt frames pushed to the senders of messages", registry=r)
        )
        self.presence_events = self.loop_counter(
            Counter("roost_presence_events_total", "Presence frames pushed to subscribers", registry=r)
        )
        # Keyed by the tag's bytes, so a push finds its counters without decoding.
        # Receipt and presence frames also move their own counters.
        self.frame_out: dict[bytes, tuple[LoopCounter, ...]] = {}
        for cls in get_args(ServerFrame):
            tag = frame_type(cls)
            extra = {"receipt": (self.receipts,), "presence": (self.presence_events,)}.get(tag, ())
            self.frame_out[tag.encode()] = (self.loop_counter(frames_out.labels(tag)), *extra)
        self.frame_out_other = (self.loop_counter(frames_out.labels("other")),)
        self.slow_consumers = Counter(
            "roost_slow_consumers_total",
            "Connections closed (4004) because their send queue was full",
            registry=r,
        )

        pool_wait = Histogram(
            "roost_store_pool_wait_seconds",
            "Time to acquire a connection from the PostgreSQL pool, by pool",
            ["pool"],
            buckets=POOL_WAIT_BUCKETS,
            registry=r,
        )
        self.pool_wait = {pool: pool_wait.labels(pool) for pool in POOLS}
        self.registry_round_seconds = Histogram(
            "roost_registry_round_seconds",
            "Duration of one Redis router round (cluster mode)",
            buckets=ROUND_BUCKETS,
            registry=r,
        )
        self.registry_round_batch_size = Histogram(
            "roost_registry_round_batch_size",
            "Items (pushes, session ops, presence changes, lookups) in one Redis router round",
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )

    def loop_counter(self, counter: Counter) -> LoopCounter:
        """``counter`` (a child, or a counter without labels) for the event loop's hot path."""
        loop_counter = LoopCounter(counter)
        self._loop_counters.counters.append(loop_counter)
        return loop_counter

    def frame_pushed(self, frame: bytes) -> None:
        """Count one server frame queued to a connection, by its type tag."""
        end = frame.find(b'"', FRAME_TAG_START)
        for counter in self.frame_out.get(frame[FRAME_TAG_START:end], self.frame_out_other):
            counter.inc()

    def closed(self, code: int | None) -> None:
        """Count one closed connection; ``None`` (no close frame) counts as 1006."""
        self._close_children.get(1006 if code is None else code, self._close_other).inc()


def frame_type(cls: type[msgspec.Struct]) -> str:
    """The wire ``type`` tag of a frame class (its label value)."""
    return str(cls.__struct_config__.tag)
