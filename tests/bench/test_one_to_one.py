"""one-to-one and baseline at tiny scale through the real ``roost bench`` command."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from roost.bench.one_to_one import cpu_ratio, is_sustained, sustained
from roost.bench.target import EmbeddedTarget
from roost.cli.main import main


def run_bench(tmp_path: Path, *argv: str) -> dict:
    out = tmp_path / "report.json"
    assert main(["bench", *argv, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def check_step(step: dict, rate: float, seconds: float) -> None:
    assert step["rate_offered"] == rate
    assert step["sent"] == int(rate * seconds)
    assert step["received"] == step["sent"] and step["missing"] == 0 and step["duplicates"] == 0
    assert step["acked"] == step["sent"] and step["receipts"] == step["sent"]
    assert step["errors"] == 0
    assert 0.8 * rate <= step["rate_achieved"] <= 1.05 * rate
    assert 0 < step["p50_ms"] <= step["p99_ms"] <= step["p999_ms"] <= step["max_ms"] < 2000
    # ✓✓ needs the recipient's dack after the message: never before the message is shown.
    assert step["receipt_p50_ms"] >= step["ack_p50_ms"] > 0
    assert step["cdf"][-1][1] == 1.0
    assert 0 <= step["loadgen_cpu_pct"] < 100 * 4


def test_one_to_one_with_baseline_and_plots(tmp_path: Path) -> None:
    plots = tmp_path / "plots"
    report = run_bench(
        tmp_path, "one-to-one", "--pairs", "2", "--rates", "200", "--step-seconds", "2",
        "--drain-timeout", "5", "--with-baseline", "--workers", "1", "--plot", str(plots),
    )  # fmt: skip
    assert report["scenario"] == "one-to-one"
    assert report["machine"]["cores"] >= 1 and "msgspec" in report["machine"]["libraries"]
    assert report["parameters"]["pairs"] == 2
    results = report["results"]
    assert results["target"]["kind"] == "embedded"
    [step] = results["steps"]
    check_step(step, 200.0, 2.0)
    assert step["server_cpu_pct"] > 0 and step["server_rss_peak_kib"] > 1000
    [base] = results["baseline"]["steps"]
    check_step(base, 200.0, 2.0)
    assert results["baseline"]["target"]["kind"] == "relay"
    assert results["baseline_ratio"] == round(results["max_sustained_rate"] / base["rate_achieved"], 3)
    assert isinstance(results["loadgen_saturated"], bool)
    names = {p.name for p in plots.iterdir()}
    assert {
        "one-to-one-embedded-cdf.png",
        "one-to-one-embedded-latency-throughput.png",
        "one-to-one-embedded-baseline-cdf.png",
    } <= names


def test_baseline_alone_two_workers(tmp_path: Path) -> None:
    report = run_bench(
        tmp_path,
        "baseline",
        "--pairs",
        "4",
        "--rates",
        "300,600",
        "--step-seconds",
        "1",
        "--drain-timeout",
        "5",
    )
    steps = report["results"]["steps"]
    assert [s["rate_offered"] for s in steps] == [300.0, 600.0]
    for step in steps:
        check_step(step, step["rate_offered"], 1.0)


def step(offered: float, achieved: float, p99: float, missing: int = 0) -> dict:
    return {
        "rate_offered": offered,
        "rate_achieved": achieved,
        "p99_ms": p99,
        "errors": 0,
        "missing": missing,
    }


def test_sustained_needs_rate_latency_and_no_loss() -> None:
    assert is_sustained(step(1000, 990, 10))
    assert not is_sustained(step(1000, 900, 10))  # fell behind
    assert not is_sustained(step(1000, 1000, 60))  # too slow
    assert not is_sustained(step(1000, 1000, 10, missing=1))
    summary = sustained([step(1000, 999, 5), step(2000, 1990, 20), step(5000, 4000, 300)])
    assert summary["max_sustained_rate"] == 1990
    assert summary["max_rate_achieved"] == 4000


def test_cpu_ratio_at_the_highest_rate_both_kept_up_with() -> None:
    def cpu_step(offered: float, achieved: float, us: float) -> dict:
        return {"rate_offered": offered, "rate_achieved": achieved, "server_cpu_us_per_msg": us}

    roost = [cpu_step(1000, 1000, 200), cpu_step(2000, 2000, 100), cpu_step(5000, 3000, 90)]
    relay = [cpu_step(1000, 1000, 50), cpu_step(2000, 1990, 40), cpu_step(5000, 5000, 30)]
    assert cpu_ratio(roost, relay) == {"baseline_cpu_ratio": 0.4, "baseline_cpu_ratio_at": 2000}
    assert cpu_ratio(roost[2:], relay) == {"baseline_cpu_ratio": None}


def test_existing_deployment_by_url_twice(tmp_path: Path) -> None:
    """--url/--store: users go straight into its store, under fresh names on every run."""
    server = EmbeddedTarget()
    server.start()
    try:
        for run in range(2):
            report = run_bench(
                tmp_path, "one-to-one", "--url", server.urls[0], "--store", str(server.server.data_dir),
                "--pairs", "2", "--rates", "100", "--step-seconds", "1", "--workers", "1",
            )  # fmt: skip
            assert report["results"]["target"]["kind"] == "url", run
            check_step(report["results"]["steps"][0], 100.0, 1.0)
    finally:
        server.stop()


def test_relay_runs_on_the_gateways_event_loop() -> None:
    """The baseline is only fair on the loop ``roost serve`` uses: on asyncio's
    default loop the relay cost ~20% more CPU per frame and flattered Roost's ratio."""
    from roost.bench.relay import RelayTarget
    from roost.gateway.server import event_loop_factory

    factory = event_loop_factory()
    expected = "asyncio.unix_events" if factory is None else type(factory()).__module__
    relay = RelayTarget()
    relay.start()
    try:
        with urllib.request.urlopen(relay.urls[0] + "/healthz", timeout=5) as resp:
            health = json.load(resp)
    finally:
        relay.stop()
    assert health["loop"] == expected
