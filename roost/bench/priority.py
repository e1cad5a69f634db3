"""CPU priority for a benchmark's side load: run it where production has other machines.

``roost bench media --upload-priority idle`` starts the uploading clients (and
a throwaway SeaweedFS) under ``SCHED_IDLE``: they get only the CPU that the
gateway and the chat load generator leave, as when phones and the object
store are other machines. ``nice`` is nice 19 (they still get a little CPU
when others want it all); ``normal`` changes nothing.

``python -m roost.bench.priority PRIORITY -- COMMAND...`` sets PRIORITY on
itself, then execs COMMAND: a policy set before the program starts holds for
every thread it will create (Linux sets policy and nice per thread, and new
threads inherit them). ``observed(pid)`` reads them back from every thread,
so a report says what really ran, not what was asked.
"""

from __future__ import annotations

import os
import sys
from typing import TypedDict

PRIORITIES = ("normal", "idle", "nice")
NICE = 19

_POLICY_NAMES = {
    os.SCHED_OTHER: "SCHED_OTHER",
    os.SCHED_BATCH: "SCHED_BATCH",
    os.SCHED_IDLE: "SCHED_IDLE",
    os.SCHED_FIFO: "SCHED_FIFO",
    os.SCHED_RR: "SCHED_RR",
}


def apply(priority: str) -> None:
    """Set ``priority`` on the calling thread (and so on the threads it starts later)."""
    if priority == "idle":
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    elif priority == "nice":
        os.setpriority(os.PRIO_PROCESS, 0, NICE)
    elif priority != "normal":
        raise ValueError(f"priority: one of {', '.join(PRIORITIES)}, not {priority!r}")


def wrap(priority: str) -> list[str]:
    """The argv prefix that runs a command at ``priority`` (empty for ``normal``)."""
    if priority not in PRIORITIES:
        raise ValueError(f"priority: one of {', '.join(PRIORITIES)}, not {priority!r}")
    if priority == "normal":
        return []
    return [sys.executable, "-m", "roost.bench.priority", priority, "--"]


class Observed(TypedDict):
    pid: int
    threads: int  # threads read
    policies: list[str]  # the policies found among them, e.g. ["SCHED_IDLE"]
    nice: list[int]  # the nice values found among them


def observed(pid: int) -> Observed:
    """The scheduling policies and nice values of every thread of ``pid`` now."""
    policies: set[str] = set()
    nices: set[int] = set()
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return {"pid": pid, "threads": 0, "policies": [], "nice": []}
    threads = 0
    for tid in tids:
        try:
            policy = os.sched_getscheduler(tid)
            nice = os.getpriority(os.PRIO_PROCESS, tid)  # Linux: a tid gives that thread's nice
        except OSError:  # the thread ended meanwhile
            continue
        threads += 1
        policies.add(_POLICY_NAMES.get(policy, str(policy)))
        nices.add(nice)
    return {"pid": pid, "threads": threads, "policies": sorted(policies), "nice": sorted(nices)}


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        raise SystemExit("usage: python -m roost.bench.priority normal|idle|nice -- COMMAND [ARG...]")
    apply(argv[0])
    os.execvp(argv[2], argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
