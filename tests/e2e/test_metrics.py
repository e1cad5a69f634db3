"""Prometheus /metrics on the admin listener: each exported metric moves when its event happens."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.helpers import RawWS, add_users, b64, close_all
from tests.e2e.server import ServerProcess, free_port

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def eventually(port: int, check: Callable[[Samples], bool], timeout: float = 10.0) -> Samples:
    """Scrape until ``check`` holds (counters updated after a close race the scrape)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        samples = await asyncio.to_thread(scrape, port)
        if check(samples) or loop.time() > deadline:
            return samples
        await asyncio.sleep(0.05)


@pytest.fixture
def metered(tmp_path: Path) -> Iterator[tuple[ServerProcess, int]]:
    admin = free_port()
    # A low rate limit so a short burst of charged frames trips it.
    srv = ServerProcess(tmp_path / "data", extra_args=["--admin-port", str(admin), "--rate-limit", "5"])
    srv.start()
    try:
        yield srv, admin
    finally:
        srv.stop()


async def test_each_metric_moves_with_its_event(metered: tuple[ServerProcess, int]) -> None:
    srv, admin = metered
    tokens = add_users(srv, ["alice", "bob", "carol"])
    before = scrape(admin)
    assert value(before, "roost_connections_open") == 0

    # An auth failure: closed with 4001.
    intruder = await RawWS.open(srv)
    await intruder.send({"type": "auth", "token": "not-a-token"})
    assert await intruder.wait_closed() == 4001
    await intruder.close()

    alice = await RawWS.open(srv, tokens["alice"])
    bob = await RawWS.open(srv, tokens["bob"])
    carol = None
    try:
        # The first message of a conversation new to bob's connection comes
        # from his inbox; later ones are pushed live. He acks each.
        for n in (1, 2, 3):
            await alice.send({"type": "send", "id": f"b{n}", "to": "bob", "body": b64("hi bob")})
            await alice.recv_type("ack")
            deliver = await bob.recv_type("msg")
            await bob.send({"type": "dack", "conv": deliver["conv"], "seq": deliver["seq"]})
            await bob.roundtrip()
        # Into carol's inbox while she is offline, read from it when she connects.
        await alice.send({"type": "send", "id": "c1", "to": "carol", "body": b64("hi carol")})
        await alice.recv_type("ack")
        carol = await RawWS.open(srv, tokens["carol"])
        await carol.recv_type("msg")

        mid = scrape(admin)
        assert value(mid, "roost_connections_open") == 3
        assert (
            value(mid, "roost_connections_accepted_total") - value(before, "roost_connections_accepted_total")
            == 4
        )
        delta = {
            key: mid.get(key, 0.0) - before.get(key, 0.0)
            for key in mid
            if key[0].startswith("roost_") and key[0] != "roost_connections_open"
        }
        assert delta[("roost_auth_failures_total", (("reason", "failed"),))] == 1
        assert delta[("roost_frames_in_total", (("type", "send"),))] == 4
        assert delta[("roost_frames_in_total", (("type", "dack"),))] == 3
        assert delta[("roost_messages_committed_total", ())] == 4
        assert delta[("roost_send_ack_seconds_count", ())] == 4
        assert delta[("roost_send_ack_seconds_sum", ())] > 0
        assert delta[("roost_store_commit_batch_size_count", ())] >= 2
        assert delta[("roost_store_commit_seconds_count", ())] >= 2
        pushed = delta[("roost_deliveries_total", (("path", "push"),))]
        from_inbox = delta[("roost_deliveries_total", (("path", "inbox"),))]
        assert pushed >= 1 and from_inbox >= 2 and pushed + from_inbox == 4
        assert delta[("roost_connections_closed_total", (("code", "4001"),))] == 1
        # Exported (at zero) before any store fault: alerts can name them.
        for kind in ("commit_failed", "writer_failed"):
            assert ("roost_store_errors_total", (("kind", kind),)) in mid

        # Over the rate limit (5/s, burst 10): reading pauses, counted.
        for _ in range(15):
            await alice.send({"type": "presence_sub", "users": ["bob"]})
        await alice.roundtrip(timeout=20)
        limited = scrape(admin)
        assert value(limited, "roost_rate_limited_total") > value(mid, "roost_rate_limited_total")
        assert value(limited, "roost_frames_in_total", type="presence_sub") == 15

        await alice.close()
        closed = await eventually(
            admin,
            lambda s: (
                value(s, "roost_connections_closed_total", code="1000") >= 1
                and value(s, "roost_connections_open") == 2
            ),
        )
        assert value(closed, "roost_connections_closed_total", code="1000") == 1
        assert value(closed, "roost_connections_open") == 2
    finally:
        await close_all(alice, bob, carol)


def test_metrics_are_not_served_on_the_public_port(metered: tuple[ServerProcess, int]) -> None:
    srv, admin = metered
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(srv.url + "/metrics", timeout=5)
    assert refused.value.code == 404
    assert (
        "roost_connections_open"
        in urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5).read().decode()
    )


def test_no_admin_listener_without_admin_port(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "data")
    srv.start()
    try:
        assert "admin_port" in srv.log() and '"admin_port": null' in srv.log()
    finally:
        srv.stop()


async def test_inbox_drain_backlog_rises_and_falls(tmp_path: Path) -> None:
    admin = free_port()
    # A window of one unacked message: bob's next messages wait for a drain.
    srv = ServerProcess(tmp_path / "data", extra_args=["--admin-port", str(admin), "--window", "1"])
    srv.start()
    alice = bob = None
    try:
        tokens = add_users(srv, ["alice", "bob"])
        alice = await RawWS.open(srv, tokens["alice"])
        bob = await RawWS.open(srv, tokens["bob"])
        for n in range(3):
            await alice.send({"type": "send", "id": f"m{n}", "to": "bob", "body": b64("x")})
            await alice.recv_type("ack")
        first = await bob.recv_type("msg")
        backlog = await eventually(admin, lambda s: value(s, "roost_inbox_drains_pending") == 1)
        assert value(backlog, "roost_inbox_drains_pending") == 1
        # Bob acks each message; the drain brings the next, until none waits.
        seen = [first["seq"]]
        await bob.send({"type": "dack", "conv": first["conv"], "seq": first["seq"]})
        while len(seen) < 3:
            msg = await bob.recv_type("msg")
            seen.append(msg["seq"])
            await bob.send({"type": "dack", "conv": msg["conv"], "seq": msg["seq"]})
        assert seen == [1, 2, 3]
        drained = await eventually(admin, lambda s: value(s, "roost_inbox_drains_pending") == 0)
        assert value(drained, "roost_inbox_drains_pending") == 0
    finally:
        await close_all(alice, bob)
        srv.stop()


async def test_auth_failures_are_counted_by_reason(metered: tuple[ServerProcess, int]) -> None:
    srv, admin = metered
    tokens = add_users(srv, ["alice"])
    before = scrape(admin)
    refusals = [
        ({"type": "ping", "t": 1}, 4001),  # not an auth frame first: bad_frame
        ({"type": "auth", "token": tokens["alice"], "v": 999}, 4005),  # version
        ({"type": "auth", "token": "nobody"}, 4001),  # failed
    ]
    for frame, code in refusals:
        raw = await RawWS.open(srv)
        try:
            await raw.send(frame)
            assert await raw.wait_closed() == code
        finally:
            await raw.close()
    after = await eventually(admin, lambda s: value(s, "roost_connections_closed_total", code="4001") >= 2)
    for reason in ("bad_frame", "version", "failed"):
        moved = value(after, "roost_auth_failures_total", reason=reason)
        assert moved - value(before, "roost_auth_failures_total", reason=reason) == 1, reason
    assert value(after, "roost_connections_closed_total", code="4001") == 2
    assert value(after, "roost_connections_closed_total", code="4005") == 1


async def test_frames_out_receipts_and_presence_are_counted(metered: tuple[ServerProcess, int]) -> None:
    srv, admin = metered
    tokens = add_users(srv, ["alice", "bob"])
    before = scrape(admin)
    alice = await RawWS.open(srv, tokens["alice"])
    bob = await RawWS.open(srv, tokens["bob"])
    try:
        # Bob is online: subscribing answers with one presence frame.
        await alice.send({"type": "presence_sub", "users": ["bob"]})
        await alice.recv_type("presence")
        await alice.send({"type": "send", "id": "m1", "to": "bob", "body": b64("hi")})
        await alice.recv_type("ack")
        deliver = await bob.recv_type("msg")
        # Bob's ✓✓ reaches alice as a receipt frame.
        await bob.send({"type": "dack", "conv": deliver["conv"], "seq": deliver["seq"]})
        await alice.recv_type("receipt")
        after = scrape(admin)
    finally:
        await close_all(alice, bob)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("roost_frames_out_total", type="welcome") == 2
    assert delta("roost_frames_out_total", type="ack") == 1
    assert delta("roost_frames_out_total", type="msg") == 1
    assert delta("roost_frames_out_total", type="presence") >= 1
    assert delta("roost_frames_out_total", type="receipt") >= 1
    assert delta("roost_receipts_total") == delta("roost_frames_out_total", type="receipt")
    assert delta("roost_presence_events_total") == delta("roost_frames_out_total", type="presence")
    # Every server frame type is exported (at zero until sent): dashboards can name them.
    for tag in ("typing_event", "group", "history_page", "pong", "error", "other"):
        assert ("roost_frames_out_total", (("type", tag),)) in after
