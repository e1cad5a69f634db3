"""PNG plots of benchmark results (``--plot DIR``), with matplotlib (``pip install roost[bench]``).

Whatever a result holds is plotted:

* ``steps`` (one-to-one, baseline): the latency CDF of every step, and
  p50/p99 latency against achieved throughput (with the baseline's, when run);
* ``groups`` (group-fanout): the time-to-all CDF per group size;
* ``samples`` (idle-connections): server memory against connections, from
  ``[{"connections": n, "rss_kib": kib}, ...]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise SystemExit("roost bench --plot needs matplotlib: pip install 'roost[bench]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf_axes(plt: Any, title: str, xlabel: str) -> tuple[Any, Any]:
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=90)
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of messages")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    return fig, ax


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_latency_cdf(steps: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    curves = [s for s in steps if s.get("cdf")]
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = _cdf_axes(plt, title, "send → shown latency (ms, log)")
    for step in curves:
        xs = [max(p[0], 0.01) for p in step["cdf"]]
        ys = [p[1] for p in step["cdf"]]
        ax.plot(xs, ys, label=f"{step['rate_offered']:,.0f} msg/s")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_latency_vs_throughput(series: dict[str, list[dict[str, Any]]], path: Path) -> Path | None:
    if not any(series.values()):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=90)
    for label, steps in series.items():
        rates = [s["rate_achieved"] for s in steps]
        line = ax.plot(rates, [s["p99_ms"] for s in steps], marker="o", label=f"{label} p99")[0]
        ax.plot(
            rates,
            [s["p50_ms"] for s in steps],
            marker=".",
            ls="--",
            color=line.get_color(),
            label=f"{label} p50",
        )
    ax.set_yscale("log")
    ax.set_xlabel("achieved throughput (delivered msg/s)")
    ax.set_ylabel("send → shown latency (ms, log)")
    ax.set_title("latency against throughput")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_time_to_all(groups: list[dict[str, Any]], path: Path) -> Path | None:
    curves = [g for g in groups if g.get("cdf")]
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = _cdf_axes(
        plt, "group fan-out: time until every online member has a post", "time to all (ms, log)"
    )
    for group in curves:
        xs = [max(p[0], 0.01) for p in group["cdf"]]
        ax.plot(xs, [p[1] for p in group["cdf"]], label=group.get("label", str(group.get("size"))))
    ax.set_ylabel("fraction of posts")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_memory(results: dict[str, Any], path: Path) -> Path | None:
    """Server memory against connections from ``results["samples"]``."""
    samples = [s for s in results.get("samples", []) if "connections" in s and "rss_kib" in s]
    if not samples:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=90)
    ax.plot(
        [s["connections"] for s in samples],
        [s["rss_kib"] / 1024 for s in samples],
        marker="o",
        label="server RSS",
    )
    ax.set_xlabel("authenticated idle connections")
    ax.set_ylabel("server memory (MiB)")
    ax.set_title("memory against connections")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def render(scenario: str, results: dict[str, Any], directory: Path) -> list[Path]:
    """Every plot ``results`` has data for; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    made: list[Path | None] = []
    series: dict[str, list[dict[str, Any]]] = {}
    kind = results.get("target", {}).get("kind", "")
    # the target in the name: embedded and cluster runs can share a directory
    stem = f"{scenario}-{kind}" if kind and scenario != "baseline" else scenario
    if results.get("steps"):
        series[kind or scenario] = results["steps"]
        made.append(plot_latency_cdf(results["steps"], directory / f"{stem}-cdf.png", f"{scenario} ({kind})"))
    baseline = results.get("baseline")
    if isinstance(baseline, dict) and baseline.get("steps"):
        series["baseline relay"] = baseline["steps"]
        made.append(plot_latency_cdf(baseline["steps"], directory / f"{stem}-baseline-cdf.png", "bare relay"))
    if series:
        made.append(plot_latency_vs_throughput(series, directory / f"{stem}-latency-throughput.png"))
    if results.get("groups"):
        made.append(plot_time_to_all(results["groups"], directory / f"{scenario}-time-to-all.png"))
    made.append(plot_memory(results, directory / f"{scenario}-memory.png"))
    return [p for p in made if p is not None]
