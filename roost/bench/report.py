"""Markdown tables from ``roost bench --json`` reports, for docs/performance.md.

python -m roost.bench.report bench-results/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

STEP_COLUMNS = [
    ("rate_offered", "offered msg/s"),
    ("rate_achieved", "achieved msg/s"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("p999_ms", "p99.9 ms"),
    ("max_ms", "max ms"),
    ("ack_p50_ms", "✓ p50"),
    ("ack_p99_ms", "✓ p99"),
    ("receipt_p50_ms", "✓✓ p50"),
    ("receipt_p99_ms", "✓✓ p99"),
    ("missing", "missing"),
    ("errors", "errors"),
    ("server_cpu_pct", "gateway CPU %"),
    ("server_cpu_us_per_msg", "gateway µs/msg"),
    ("server_loop_cpu_pct", "of which event loop %"),
    ("server_threads_cpu_pct", "store threads %"),
    ("backend_cpu_pct", "PG+Redis CPU %"),
    ("loadgen_cpu_pct", "loadgen CPU % (busiest)"),
    ("send_lag_p99_ms", "send lag p99 ms"),
    ("machine_busy_pct", "machine busy %"),
]

GROUP_COLUMNS = [
    ("label", "group"),
    ("online_receivers", "online receivers"),
    ("posts_complete", "posts complete"),
    ("p50_ms", "time to all p50 ms"),
    ("p99_ms", "p99 ms"),
    ("max_ms", "max ms"),
    ("reconnect_drain_seconds", "offline half drained in s"),
    ("offline_received_all", "offline half got all"),
    ("server_cpu_pct", "server CPU %"),
    ("server_cpu_us_per_delivery", "server µs/delivery"),
    ("server_loop_cpu_pct", "of which event loop %"),
    ("server_threads_cpu_pct", "store threads %"),
    ("machine_busy_pct", "machine busy %"),
]

DRAIN_COLUMNS = [
    ("messages", "messages"),
    ("recipients", "recipients"),
    ("queue_rate", "queued msg/s"),
    ("drain_seconds", "drain s"),
    ("rate_achieved", "drained msg/s"),
    ("received", "received (unique)"),
    ("missing", "missing"),
    ("duplicates", "duplicates"),
    ("server_cpu_pct", "server CPU %"),
    ("server_cpu_us_per_msg", "server µs/msg"),
    ("server_loop_cpu_pct", "of which event loop %"),
    ("server_threads_cpu_pct", "store threads %"),
    ("machine_busy_pct", "machine busy %"),
]


def cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return (
            f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
        )
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


# Columns that only mean something for some targets (PostgreSQL + Redis; SQLite threads):
# left out when zero in every row.
OPTIONAL = {"backend_cpu_pct", "server_threads_cpu_pct"}


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    used = [
        (key, title)
        for key, title in columns
        if any(key in r for r in rows) and (key not in OPTIONAL or any(r.get(key) for r in rows))
    ]
    lines = ["| " + " | ".join(title for _, title in used) + " |", "|" + "---|" * len(used)]
    lines += ["| " + " | ".join(cell(r.get(key)) for key, _ in used) + " |" for r in rows]
    return "\n".join(lines)


def scalars(data: dict[str, Any]) -> str:
    rows = [(k, v) for k, v in data.items() if not isinstance(v, (dict, list))]
    return "\n".join(["| figure | value |", "|---|---|", *(f"| `{k}` | {cell(v)} |" for k, v in rows)])


def render(report: dict[str, Any]) -> str:
    scenario = report["scenario"]
    results = report["results"]
    target = results.get("target", {})
    head = f"### {scenario} ({target.get('kind', 'relay')}, {target.get('gateways', 1)} gateway(s))"
    commit = report.get("machine", {}).get("roost_commit", "")
    at = f", commit {commit}" if commit else ""
    parts = [head, f"`{_command(report)}` — {report['started']}{at}, {report['duration_s']} s"]
    if "baseline" in results:
        parts += [
            "Bare relay (baseline), same clients and steps:",
            table(results["baseline"]["steps"], STEP_COLUMNS),
        ]
        parts.append("Roost:")
    if "steps" in results:
        parts.append(table(results["steps"], STEP_COLUMNS))
        summary = {
            k: results.get(k)
            for k in (
                "max_sustained_rate",
                "max_rate_achieved",
                "baseline_ratio",
                "baseline_cpu_ratio",
                "baseline_cpu_ratio_at",
            )
        }
        parts.append(scalars({k: v for k, v in summary.items() if v is not None}))
    elif "groups" in results:
        parts.append(table(results["groups"], GROUP_COLUMNS))
    elif scenario == "offline-drain":
        parts.append(table([results], DRAIN_COLUMNS))
    else:
        parts.append(scalars(results))
    for flag in ("loadgen_saturated", "machine_saturated"):
        if results.get(flag):
            parts.append(f"**{flag}**: the figures above may be bounded by CPU contention, not the server.")
    return "\n\n".join(parts)


def _command(report: dict[str, Any]) -> str:
    params = report.get("parameters", {})
    flags = []
    for key, value in params.items():
        if key in ("scenario", "json", "plot") or (value in (None, False, [], 0) and key != "workers"):
            continue
        flag = "--" + key.replace("_", "-")
        flags.append(flag if value is True else f"{flag} {value}")
    return " ".join(["roost bench", report["scenario"], *flags])


def main(argv: list[str] | None = None) -> int:
    paths = argv if argv is not None else sys.argv[1:]
    for path in paths:
        print(render(json.loads(Path(path).read_text())))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
