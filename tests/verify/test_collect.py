"""How verify turns client logs and state files into a history (no processes)."""

from __future__ import annotations

import json
from pathlib import Path

from roost.client.state import ClientState, OutboxItem
from roost.verify.agent import UserConfig
from roost.verify.history import check
from roost.verify.run import collect, split_latencies


def write_log(path: Path, records: list[dict]) -> None:  # type: ignore[type-arg]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"k": "sent", "torn')


def users(tmp_path: Path) -> dict[str, UserConfig]:
    return {
        n: UserConfig(n, "t", str(tmp_path / f"{n}.state"), str(tmp_path / f"{n}.log")) for n in ("a", "b")
    }


CONV = "d:a:b"


def test_a_repeat_after_a_crash_is_not_a_duplicate_but_one_within_an_incarnation_is(tmp_path: Path) -> None:
    u = users(tmp_path)
    write_log(Path(u["a"].log), [
        {"k": "sent", "id": "a-0", "i": 0, "t": 1.0},
        {"k": "acked", "id": "a-0", "conv": CONV, "seq": 1, "t": 1.1},
        {"k": "receipt", "conv": CONV, "marks": {"b": [1, 0]}, "t": 1.3},
    ])  # fmt: skip
    shown = {"k": "shown", "conv": CONV, "seq": 1, "from": "a", "id": "a-0", "t": 1.2}
    write_log(Path(u["b"].log), [{**shown, "inc": 1}, {**shown, "inc": 2}])
    history, redisplayed = collect(u, {}, with_state=False)
    assert redisplayed == 1
    assert check(history).violations == []

    write_log(Path(u["b"].log), [{**shown, "inc": 1}, {**shown, "inc": 1}])
    history, _ = collect(u, {}, with_state=False)
    assert [v.kind for v in check(history).violations] == ["duplicate"]


def test_state_files_complete_acks_and_ticks_a_killed_process_did_not_log(tmp_path: Path) -> None:
    u = users(tmp_path)
    write_log(Path(u["a"].log), [{"k": "sent", "id": "a-0", "i": 0, "t": 1.0}])
    write_log(Path(u["b"].log), [
        {"k": "shown", "conv": CONV, "seq": 1, "from": "a", "id": "a-0", "t": 1.2, "inc": 1},
    ])  # fmt: skip
    # Without the state the ✓ is unknown, so nothing can be required of it.
    history, _ = collect(u, {}, with_state=False)
    assert history.sent[0].acked is False
    assert check(history).violations == []
    # The SDK had committed the ✓ before its process was killed ...
    state = ClientState(u["a"].state)
    state.outbox_add(OutboxItem("a-0", "b", None, "text/plain", b"x", 0))
    state.outbox_remove("a-0")
    state.store_message(CONV, 1, "a-0", "a", "text/plain", b"x", 0)
    state.commit()
    history, _ = collect(u, {}, with_state=True)
    assert history.sent[0].acked and (history.sent[0].conv, history.sent[0].seq) == (CONV, 1)
    assert [v.kind for v in check(history).violations] == ["missing_receipt"]
    # ... and the tick too.
    state.save_receipt(CONV, 1, 0)
    state.close()
    history, _ = collect(u, {}, with_state=True)
    assert check(history).violations == []


def test_an_acked_message_nobody_shows_is_lost(tmp_path: Path) -> None:
    u = users(tmp_path)
    write_log(Path(u["a"].log), [
        {"k": "sent", "id": "a-0", "i": 0, "t": 1.0},
        {"k": "acked", "id": "a-0", "conv": CONV, "seq": 1, "t": 1.1},
    ])  # fmt: skip
    write_log(Path(u["b"].log), [])
    history, _ = collect(u, {}, with_state=False)
    assert [v.kind for v in check(history).violations] == ["lost"]


def test_latencies_split_by_fault_windows(tmp_path: Path) -> None:
    u = users(tmp_path)
    write_log(Path(u["a"].log), [
        {"k": "sent", "id": "a-0", "i": 0, "t": 1.0},
        {"k": "sent", "id": "a-1", "i": 1, "t": 20.0},
    ])  # fmt: skip
    write_log(Path(u["b"].log), [
        {"k": "shown", "conv": CONV, "seq": 1, "from": "a", "id": "a-0", "t": 1.005, "inc": 1},
        {"k": "shown", "conv": CONV, "seq": 2, "from": "a", "id": "a-1", "t": 21.0, "inc": 1},
    ])  # fmt: skip
    history, _ = collect(u, {}, with_state=False)
    quiet, faulty = split_latencies(history, [(15.0, 21.5)])
    assert [round(x) for x in quiet] == [5] and [round(x) for x in faulty] == [1000]


def test_a_receipts_aggregate_speaks_for_every_member(tmp_path: Path) -> None:
    """Group receipts name only the members whose marks moved; when they
    coalesce, the aggregate (all delivered up to N) still covers everyone."""
    group = "g:1"
    u = {
        n: UserConfig(n, "t", str(tmp_path / f"{n}.state"), str(tmp_path / f"{n}.log"))
        for n in ("a", "b", "c")
    }
    write_log(Path(u["a"].log), [
        {"k": "sent", "id": "a-0", "i": 0, "t": 1.0},
        {"k": "acked", "id": "a-0", "conv": group, "seq": 1, "t": 1.1},
        {"k": "receipt", "conv": group, "marks": {"c": [1, 0]}, "all": [1, 0], "t": 1.3},
    ])  # fmt: skip
    for n in ("b", "c"):
        write_log(Path(u[n].log), [
            {"k": "shown", "conv": group, "seq": 1, "from": "a", "id": "a-0", "t": 1.2, "inc": 1},
        ])  # fmt: skip
    members = {group: ["a", "b", "c"]}
    history, _ = collect(u, members, with_state=False)
    assert check(history).violations == []
    # Without the aggregate, b's delivery would be unknown to a.
    write_log(Path(u["a"].log), [
        {"k": "sent", "id": "a-0", "i": 0, "t": 1.0},
        {"k": "acked", "id": "a-0", "conv": group, "seq": 1, "t": 1.1},
        {"k": "receipt", "conv": group, "marks": {"c": [1, 0]}, "all": [0, 0], "t": 1.3},
    ])  # fmt: skip
    history, _ = collect(u, members, with_state=False)
    assert [v.kind for v in check(history).violations] == ["missing_receipt"]
