"""``roost bench SCENARIO``: common flags, the machine description, the report.

Every scenario gets ``--json FILE``, ``--plot DIR``, ``--workers N`` and the
target flags (``roost.bench.target``). The JSON report is
``{scenario, parameters, machine, started, duration_s, results}``;
``results["loadgen_saturated"]`` is true when any load-generator process used
more than ``SATURATED_PCT`` of a core during a measurement (then the figures
may describe the load generator, not the server).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from roost.bench import SCENARIOS

# A worker above this share of one core is the bottleneck, not the server.
SATURATED_PCT = 90.0
# All cores this busy: the figures describe a CPU-starved machine.
MACHINE_BUSY_PCT = 95.0


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    from roost.bench.target import add_target_arguments

    parser.add_argument("--json", default=None, metavar="FILE", help="write the report as JSON here")
    parser.add_argument("--plot", default=None, metavar="DIR", help="render PNG plots into this directory")
    parser.add_argument("--workers", type=int, default=2, help="load-generator processes")
    add_target_arguments(parser)


def _load(module_name: str) -> ModuleType | None:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:  # that scenario is not built (yet)
            return None
        raise


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = sub.add_parser("bench", help="benchmarks: load a real deployment and measure it")
    scenarios = bench.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    for name, module_name in SCENARIOS.items():
        module = _load(module_name)
        if module is None:
            continue
        doc = (module.__doc__ or name).strip().splitlines()[0]
        p = scenarios.add_parser(name, help=doc, description=module.__doc__)
        add_common_arguments(p)
        module.add_arguments(p)
        p.set_defaults(func=run_cli, bench_module=module_name)


def parameters_of(args: argparse.Namespace) -> dict[str, Any]:
    skip = {"func", "bench_module", "command"}
    return {k: v for k, v in vars(args).items() if k not in skip}


def any_saturated(data: Any) -> bool:
    """Whether any step or phase anywhere in ``data`` flagged ``loadgen_saturated``."""
    if isinstance(data, dict):
        return bool(data.get("loadgen_saturated")) or any(any_saturated(v) for v in data.values())
    if isinstance(data, list):
        return any(any_saturated(v) for v in data)
    return False


def max_machine_busy(data: Any) -> float:
    """The highest ``machine_busy_pct`` (all cores, any process) anywhere in ``data``."""
    if isinstance(data, dict):
        own = float(data.get("machine_busy_pct", 0.0))
        return max([own, *(max_machine_busy(v) for v in data.values())])
    if isinstance(data, list):
        return max((max_machine_busy(v) for v in data), default=0.0)
    return 0.0


def mark_saturation(results: dict[str, Any]) -> bool:
    """Set ``loadgen_saturated`` at the top when any step or phase saw it, and
    ``machine_saturated`` when every core was busy (the server and the load
    generator then competed for CPU, with each other or with other runs)."""
    saturated = results["loadgen_saturated"] = any_saturated(results)
    results["machine_saturated"] = max_machine_busy(results) > MACHINE_BUSY_PCT
    return saturated


def pin_cpus(server_cpus: str | None) -> None:
    """Servers started from here on run on ``server_cpus`` (``taskset -c`` list);
    this process and its load-generator workers on the other CPUs."""
    if not server_cpus:
        return
    import os

    from roost.devcluster.embedded import SERVER_CPUS_ENV, parse_cpu_list

    server = parse_cpu_list(server_cpus)
    rest = set(os.sched_getaffinity(0)) - server
    if not rest:
        raise SystemExit(f"roost bench: --server-cpus {server_cpus} leaves no CPU for the load generator")
    os.environ[SERVER_CPUS_ENV] = server_cpus
    os.sched_setaffinity(0, rest)


def run_cli(args: argparse.Namespace) -> int:
    from roost.bench.stats import machine
    from roost.cli.progress import Progress, on_terminal

    module = importlib.import_module(args.bench_module)
    pin_cpus(getattr(args, "server_cpus", None))
    started = datetime.now(UTC)
    t0 = time.monotonic()
    progress = Progress(f"roost bench {args.scenario}", on_terminal(args.json))
    with progress, progress.stdout_through_bars():
        progress.phase("running")
        results = module.run(args)
    mark_saturation(results)
    report = {
        "scenario": args.scenario,
        "parameters": parameters_of(args),
        "machine": machine(),
        "started": started.isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - t0, 1),
        "results": results,
    }
    print_report(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        from roost.bench.plot import render

        for path in render(args.scenario, results, Path(args.plot)):
            print(f"plot: {path}")
    return 0


# --------------------------------------------------------------------------
# the readable report
# --------------------------------------------------------------------------

_STEP_COLUMNS = (
    "label", "online_receivers", "posts_complete",
    "rate_offered", "rate_achieved", "p50_ms", "p99_ms", "p999_ms", "max_ms",
    "ack_p50_ms", "ack_p99_ms", "receipt_p50_ms", "receipt_p99_ms", "errors", "missing",
    "server_cpu_pct", "server_cpu_us_per_msg", "loadgen_cpu_pct", "send_lag_p99_ms", "machine_busy_pct",
)  # fmt: skip


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _print_table(rows: list[dict[str, Any]], out: Any) -> None:
    # The main figures only: the JSON report has every field.
    columns = [c for c in _STEP_COLUMNS if any(c in r for r in rows)] or [
        k for k, v in rows[0].items() if not isinstance(v, (list, dict))
    ]
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  " + "  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)), file=out)
    for row in cells:
        print("  " + "  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)), file=out)


def _print_section(title: str, data: dict[str, Any], out: Any, indent: str = "") -> None:
    print(f"{indent}{title}:", file=out)
    for key, value in data.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            print(f"{indent}  {key}:", file=out)
            _print_table(value, out)
        elif isinstance(value, dict):
            _print_section(key, value, out, indent + "  ")
        elif not isinstance(value, list):
            print(f"{indent}  {key}: {_fmt(value)}", file=out)


def print_report(report: dict[str, Any], out: Any = None) -> None:
    # sys.stdout looked up per call: a default bound at import time kept the
    # stream of whoever imported this module first (a closed capture in tests).
    out = sys.stdout if out is None else out
    m = report["machine"]
    print(
        f"roost bench {report['scenario']}  ({m['cores']} cores, {m['memory_mib']:,} MiB, "
        f"Python {m['python']}; {report['duration_s']} s)",
        file=out,
    )
    _print_section("results", report["results"], out)
    if report["results"].get("loadgen_saturated"):
        print(
            f"WARNING: a load-generator process used more than {SATURATED_PCT:.0f}% of a core: "
            "figures may be bounded by the load generator, not the server.",
            file=out,
        )
    if report["results"].get("machine_saturated"):
        print(
            f"WARNING: all cores were more than {MACHINE_BUSY_PCT:.0f}% busy during a measurement: "
            "server and load generator competed for CPU (see machine_busy_pct).",
            file=out,
        )
