"""Bundle fetches through four real gateways on one PostgreSQL at once: no
one-time key is handed out twice, none is lost, and the stock is exact."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.cluster import ClusterServer, ClusterServices
from tests.e2e.helpers import RawWS, add_users, close_all
from tests.keys_material import Identity, upload

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

GATEWAYS = 4
REQUESTERS_PER_GATEWAY = 5
FETCHES = 10  # per requester, all sent at once (within the per-target burst of 10)
EC_STOCK = 100  # fewer than the 200 fetches: drained, each key once
KEM_STOCK = 300  # more than the fetches: every fetch gets its own


@pytest.fixture
def four_gateways(cluster_services: ClusterServices, tmp_path: Path) -> Iterator[ClusterServer]:
    cluster_services.flush_redis()
    srv = ClusterServer(cluster_services, tmp_path / "cluster", gateways=GATEWAYS)
    try:
        srv.start(timeout=60)  # four interpreters starting at once on a shared machine
        yield srv
    finally:
        srv.stop()


async def _fetch_all(ws: RawWS, name: str) -> list[dict[str, Any]]:
    for i in range(FETCHES):
        await ws.send({"type": "keys_get", "user": "alice", "ref": f"{name}-{i}"})
    answers: list[dict[str, Any]] = []
    while len(answers) < FETCHES:
        frame = await ws.recv(30)
        if frame.get("ref", "").startswith(f"{name}-"):
            answers.append(frame)
    return answers


async def test_four_gateways_fetching_at_once_hand_out_each_one_time_key_once(
    four_gateways: ClusterServer,
) -> None:
    srv = four_gateways
    requesters = [f"r{i}" for i in range(GATEWAYS * REQUESTERS_PER_GATEWAY)]
    tokens = add_users(srv, ["alice", *requesters])
    alice = await RawWS.open(srv, tokens["alice"])
    sockets: list[RawWS] = []
    try:
        ident = Identity.generate()
        for n in range(3):
            ec = range(n * 100 + 1, n * 100 + 101) if n * 100 < EC_STOCK else []
            frame = upload(ident, ec_ids=ec, kem_ids=range(n * 100 + 1, n * 100 + 101), last_resort=9999)
            frame["ref"] = f"put{n}"
            await alice.send(frame)
            answer, _ = await alice.recv_until(lambda fr, n=n: fr.get("ref") == f"put{n}")
            assert answer["type"] == "keys_state", answer
        # Requesters spread over the four gateways (srv.url takes them in turn).
        sockets = [await RawWS.open(srv, tokens[name]) for name in requesters]
        results = await asyncio.gather(
            *(_fetch_all(ws, name) for ws, name in zip(sockets, requesters, strict=True))
        )
        bundles = [b for answers in results for b in answers]
        assert all(b["type"] == "keys_bundle" for b in bundles), [
            b for b in bundles if b["type"] != "keys_bundle"
        ][:3]
        devices = [b["devices"][0] for b in bundles]
        ec_ids = [d["prekey"]["id"] for d in devices if d["prekey"] is not None]
        kem_ids = [d["kem"]["id"] for d in devices if not d["kem_last_resort"]]
        assert sorted(ec_ids) == list(range(1, EC_STOCK + 1))  # each once, none lost
        assert (
            len(kem_ids) == len(set(kem_ids)) == len(bundles) == GATEWAYS * REQUESTERS_PER_GATEWAY * FETCHES
        )
        await alice.send({"type": "keys_count", "ref": "count"})
        count, _ = await alice.recv_until(lambda fr: fr.get("ref") == "count")
        assert (count["ec"], count["kem"]) == (0, KEM_STOCK - len(bundles))
    finally:
        await close_all(alice, *sockets)
