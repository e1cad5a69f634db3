"""Long commands show progress on a terminal only: piped or with --json, their output is unchanged."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.cli_subprocess import REPO, ROOST, run_on_terminal, run_roost


def on_terminal(tmp_path: Path, *args: str, timeout: float = 120, module: bool = True) -> tuple[int, str]:
    """Run ``roost ARGS`` (``python ARGS`` without ``module``) on a 100-column pseudo-terminal."""
    argv = [*ROOST, *args] if module else [sys.executable, *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return run_on_terminal(argv, env=env, cwd=tmp_path, timeout=timeout, columns=100)


def piped(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_roost(*args, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path, timeout=120)


def test_simulate_shows_a_bar_on_a_terminal_only(tmp_path: Path) -> None:
    code, out = on_terminal(tmp_path, "simulate", "--seeds", "12")
    assert code == 0
    assert re.search(r"roost simulate: seeds: +\d+%\|.*\| *\d+/12", out), out
    assert "failing=0" in out
    # The bar is erased: the summary starts on a clean line.
    assert re.search(r"\r +\rroost simulate: 12 runs", out), out

    quiet = piped(tmp_path, "simulate", "--seeds", "12")
    assert quiet.returncode == 0
    assert quiet.stderr == "" and "%|" not in quiet.stdout and "\r" not in quiet.stdout
    assert quiet.stdout.startswith("roost simulate: 12 runs")

    code, with_json = on_terminal(tmp_path, "simulate", "--seeds", "12", "--json", "summary.json")
    assert code == 0 and "%|" not in with_json and "\r\x1b" not in with_json
    assert (tmp_path / "summary.json").exists()


def test_bench_lines_go_above_the_bar(tmp_path: Path) -> None:
    args = (
        "bench",
        "one-to-one",
        "--pairs",
        "1",
        "--rates",
        "100",
        "--step-seconds",
        "1.5",
        "--workers",
        "1",
    )
    code, out = on_terminal(tmp_path, *args, "--drain-timeout", "5")
    assert code == 0, out
    assert "roost bench one-to-one: running: 00:0" in out
    step = out.index("[embedded] offered 100/s")
    assert re.search(r"\r +\r$", out[:step]), out[:step]  # the bar was cleared before the line
    assert "\rroost bench one-to-one: running" in out[step:]  # and drawn again after it


TIMED = """
import time
from roost.cli.progress import Progress
with Progress("roost verify", enabled=True) as progress:
    progress.phase("workload under faults", seconds=1.0)
    time.sleep(1.6)  # the workload the bar stands for
    progress.phase("collecting the history")
print("report")
"""


def test_a_timed_phase_advances_with_the_clock_and_is_erased(tmp_path: Path) -> None:
    code, out = on_terminal(tmp_path, "-c", TIMED, module=False)
    assert code == 0, out
    assert "roost verify: workload under faults:   0%" in out
    assert re.search(r"roost verify: workload under faults: 100%\|[^|]*\| 1 of 1 s", out), out
    assert "roost verify: collecting the history: 00:00" in out
    assert re.search(r"\r +\rreport", out), out
