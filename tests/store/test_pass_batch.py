"""PassBatcher: lookups of one loop pass share one fetch, each caller gets its own answer."""

from __future__ import annotations

import asyncio

import pytest

from roost.store.base import StoreUnavailable
from roost.store.pass_batch import PassBatcher


class Fetcher:
    def __init__(self, fail: Exception | None = None, delay: float = 0.0) -> None:
        self.calls: list[list[int]] = []
        self.fail = fail
        self.delay = delay

    async def __call__(self, keys: list[int]) -> dict[int, str]:
        self.calls.append(keys)
        await asyncio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        return {k: f"v{k}" for k in keys if k % 2 == 0}  # odd keys are missing


async def test_one_pass_is_one_fetch_per_chunk_and_every_caller_gets_its_answer() -> None:
    fetch = Fetcher()
    batcher = PassBatcher(fetch, lambda: None, chunk=4)
    keys = [0, 1, 2, 3, 4, 5, 6, 2]  # 2 asked twice
    got = await asyncio.gather(*(batcher.get(k) for k in keys))
    assert got == ["v0", None, "v2", None, "v4", None, "v6", "v2"]
    assert fetch.calls == [[0, 1, 2, 3], [4, 5, 6]]
    assert await batcher.get(8) == "v8"  # a later pass: a fetch of its own
    assert fetch.calls[-1] == [8]


async def test_missing_values_are_fresh_objects() -> None:
    batcher: PassBatcher[int, list[int]] = PassBatcher(Fetcher(), list)
    first, second = await asyncio.gather(batcher.get(1), batcher.get(3))
    assert first == second == [] and first is not second


async def test_a_failed_fetch_fails_every_caller_of_its_chunk() -> None:
    batcher = PassBatcher(Fetcher(fail=StoreUnavailable("down")), lambda: None)
    results = await asyncio.gather(batcher.get(1), batcher.get(2), return_exceptions=True)
    assert [type(r) for r in results] == [StoreUnavailable, StoreUnavailable]


async def test_a_caller_that_gives_up_does_not_cancel_the_others() -> None:
    fetch = Fetcher(delay=0.05)
    batcher = PassBatcher(fetch, lambda: None)
    quitter = asyncio.ensure_future(batcher.get(2))
    stayer = asyncio.ensure_future(batcher.get(2))
    await asyncio.sleep(0.01)
    quitter.cancel()
    assert await stayer == "v2"
    with pytest.raises(asyncio.CancelledError):
        await quitter
    assert len(fetch.calls) == 1
