"""tune_gc: a gateway taking on thousands of connections at once runs no full collection."""

from __future__ import annotations

import gc
from typing import Any

from roost.gateway.server import tune_gc


def test_a_growing_heap_runs_no_full_collection_once_tuned() -> None:
    """300,000 new objects kept (≈ 5,000 connections' worth) after tune_gc:
    no full collection; with CPython's defaults the same growth runs several."""
    before = gc.get_threshold()
    full: list[int] = []

    def count_full(phase: str, info: dict[str, Any]) -> None:
        if phase == "start" and info["generation"] == 2:
            full.append(1)

    gc.collect()  # every generation's count back to 0
    gc.callbacks.append(count_full)
    try:
        tune_gc()
        held = [[i] for i in range(300_000)]
        assert len(held) == 300_000
        assert full == []
        assert gc.get_freeze_count() > 0
    finally:
        gc.callbacks.remove(count_full)
        gc.unfreeze()
        gc.set_threshold(*before)


def test_young_collections_wait_for_many_new_objects_once_tuned() -> None:
    """10,000 new objects kept run no young collection after tune_gc; with
    CPython's threshold of 700 they run more than ten."""
    before = gc.get_threshold()
    young: list[int] = []

    def count_young(phase: str, info: dict[str, Any]) -> None:
        if phase == "start" and info["generation"] == 0:
            young.append(1)

    gc.collect()
    gc.callbacks.append(count_young)
    try:
        tune_gc()
        held = [[i] for i in range(10_000)]
        assert len(held) == 10_000
        assert young == []
    finally:
        gc.callbacks.remove(count_young)
        gc.unfreeze()
        gc.set_threshold(*before)
