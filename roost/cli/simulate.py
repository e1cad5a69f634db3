"""``roost simulate``: run the deterministic simulator over many seeds, or replay one.

roost simulate --seeds 2000 [--start 0]     # runs/s, failing seeds, the first failure's trace
roost simulate --seed 17 --trace            # replay one run exactly, every event
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from roost.cli.errors import UsageError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from roost.sim.faults import DEFAULT_FAULTS, FAULT_KINDS

    p = sub.add_parser(
        "simulate", help="deterministic simulation of clients, gateways, store and network under faults"
    )
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--seeds", type=int, help="run this many seeds (from --start)")
    which.add_argument("--seed", type=int, help="run (replay) this one seed")
    p.add_argument("--start", type=int, default=0, help="first seed with --seeds")
    p.add_argument("--trace", action="store_true", help="with --seed: print every event of the run")
    p.add_argument(
        "--faults",
        default="default",
        help=f"comma-separated fault kinds, 'all', 'none' or 'default' ({','.join(DEFAULT_FAULTS)});"
        f" kinds: {','.join(FAULT_KINDS)}",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="also fail on violations explained by a documented gap (docs/simulation.md)",
    )
    p.add_argument("--json", default=None, help="write the summary as JSON here")
    p.set_defaults(func=_simulate)


def _fault_kinds(spec: str) -> tuple[str, ...]:
    from roost.sim.faults import DEFAULT_FAULTS, FAULT_KINDS

    if spec == "default":
        return DEFAULT_FAULTS
    if spec == "all":
        return FAULT_KINDS
    if spec == "none":
        return ()
    kinds = tuple(k.strip() for k in spec.split(",") if k.strip())
    unknown = [k for k in kinds if k not in FAULT_KINDS]
    if unknown:
        raise UsageError(f"unknown fault kind(s) {', '.join(unknown)}")
    return kinds


def _pin_hash_seed() -> None:
    """Re-run this command with PYTHONHASHSEED=0, so a seed replays in any process.

    The SQLite store iterates a set of user names when it builds receipts, and
    the order of a set of strings depends on the process's hash seed. Only a
    command typed on the command line is re-run (``main([...])`` in a test
    keeps its process: replays within one process are identical anyway).
    """
    if os.environ.get("PYTHONHASHSEED") == "0" or sys.argv[1:2] != ["simulate"]:
        return
    sys.stdout.flush()
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    os.execve(sys.executable, [sys.executable, "-m", "roost.cli.main", *sys.argv[1:]], env)


def _simulate(args: argparse.Namespace) -> int:
    _pin_hash_seed()
    # The service logs every injected failure; the verdict and the trace say it better.
    logging.getLogger("roost").setLevel(logging.CRITICAL)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    faults = _fault_kinds(args.faults)
    if args.seed is not None:
        return _one(args.seed, faults, args.trace, args.strict)
    return _many(args.start, args.seeds, faults, args.json, args.strict)


def _failed(result: Any, strict: bool) -> bool:
    return bool(result.violations) if strict else not result.ok


def _one(seed: int, faults: tuple[str, ...], full: bool, strict: bool) -> int:
    from roost.sim.world import run_seed

    result = run_seed(seed, faults)
    lines = result.trace.lines()
    if full:
        print("\n".join(lines))
    print(_summary(result))
    print(f"trace: {len(lines)} events, sha256 {trace_digest(lines)}")
    if result.violations:
        print(_failure(result, full_trace_printed=full))
    return 1 if _failed(result, strict) else 0


def _many(start: int, count: int, faults: tuple[str, ...], json_path: str | None, strict: bool) -> int:
    from roost.cli.progress import Progress, on_terminal
    from roost.sim.world import run_seed

    progress = Progress("roost simulate", on_terminal(json_path))
    progress.phase("seeds", total=count, unit="run")
    failing: list[int] = []
    known: list[int] = []  # only violations of documented gaps
    first: Any = None
    totals = {"sent": 0, "acked": 0, "delivered": 0, "faults": 0}
    # Violation kinds summed over the runs, end-to-end ones beside the delivery ones (goal: 0 each).
    kinds = {kind: 0 for kind in ("lost", "duplicate", "reordered", "gap", "undecryptable", "plaintext")}
    began = time.perf_counter()
    cpu = time.process_time()
    for seed in range(start, start + count):
        result = run_seed(seed, faults)
        totals["sent"] += result.report.sent
        totals["acked"] += result.report.acked
        totals["delivered"] += result.report.delivered
        totals["faults"] += sum(result.faults.values())
        for v in result.unexplained:
            if v.kind in kinds:
                kinds[v.kind] += 1
        if _failed(result, strict):
            failing.append(seed)
            if first is None:
                first = result
        elif result.violations:
            known.append(seed)
        progress.advance(failing=len(failing))
    progress.close()
    wall = time.perf_counter() - began
    cpu = time.process_time() - cpu
    print(
        f"roost simulate: {count} runs (seeds {start}..{start + count - 1}) in {wall:.1f} s:"
        f" {count / wall:.1f} runs/s, {cpu / count * 1000:.1f} ms CPU per run"
    )
    print(
        f"messages sent {totals['sent']}, acked {totals['acked']}, delivered (message x recipient)"
        f" {totals['delivered']}, faults injected {totals['faults']}"
    )
    print("violations (goal 0 each): " + ", ".join(f"{kind} {n}" for kind, n in kinds.items()))
    print(f"fault kinds: {','.join(faults) or 'none'}")
    print(f"failing seeds: {len(failing)}" + (f" {failing[:20]}" if failing else ""))
    if known:
        print(
            f"seeds with only known gaps (docs/simulation.md; --strict fails them): {len(known)} {known[:20]}"
        )
    if first is not None:
        print(_failure(first, full_trace_printed=False))
    if json_path:
        summary = {
            "start": start,
            "runs": count,
            "wall_s": wall,
            "cpu_s": cpu,
            "failing": failing,
            "known_gaps": known,
            "violations": kinds,
            **totals,
        }
        Path(json_path).write_text(json.dumps(summary, indent=2))
    return 1 if failing else 0


def _summary(result: Any) -> str:
    r = result.report
    s = result.scenario
    faults = ", ".join(f"{k} {v}" for k, v in result.faults.items()) or "none"
    return (
        f"seed {result.seed}: {len(s.users)} users, {s.gateways} gateway(s), {len(s.groups)} group(s),"
        f" window {s.window}; sent {r.sent}, acked {r.acked}, delivered {r.delivered}; faults: {faults};"
        f" {_verdict(result)}"
    )


def _verdict(result: Any) -> str:
    if not result.violations:
        return "OK"
    known = f" ({len(result.known)} from known gaps)" if result.known else ""
    return f"{len(result.violations)} violation(s){known}"


def _failure(result: Any, full_trace_printed: bool) -> str:
    from roost.sim.trace import relevant

    lines = [f"{'FAILED' if not result.ok else 'known gaps only,'} seed {result.seed}:"]
    for v in result.violations[:20]:
        gap = result.gaps.get(v)
        lines.append(f"  {v.kind} {v.conv}#{v.seq}: {v.detail}" + (f"  [known gap: {gap}]" if gap else ""))
    if not full_trace_printed:
        users = result.involved_users()
        lines.append(f"the events that led to it (faults, and {', '.join(sorted(users)) or 'everyone'}):")
        lines += ["  " + line for line in relevant(result.trace, result.violations, users)]
    lines.append(f"replay: roost simulate --seed {result.seed} --trace")
    return "\n".join(lines)


def trace_digest(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


__all__ = ["register", "trace_digest"]
