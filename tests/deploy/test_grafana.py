"""deploy/grafana/roost.json: a well-formed dashboard with a panel for every Roost metric."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.deploy.metric_names import exported_families, exported_names, roost_names

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "roost.json"
GRID_WIDTH = 24  # Grafana's grid is 24 columns wide


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def expressions(board: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(board) for t in p.get("targets", [])]


def test_dashboard_has_the_variables_it_filters_by() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 36
    assert board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] == "${datasource}"


def test_panels_have_targets_unique_ids_and_a_valid_place() -> None:
    board = dashboard()
    ids: list[int] = []
    taken: set[tuple[int, int]] = set()
    for panel in panels(board):
        ids.append(panel["id"])
        if panel["type"] == "row":
            continue
        assert panel["title"], panel["id"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        targets = panel["targets"]
        assert targets, f"no targets: {panel['title']}"
        ref_ids = [t["refId"] for t in targets]
        assert len(set(ref_ids)) == len(ref_ids), f"repeated refId in {panel['title']}"
        grid = panel["gridPos"]
        assert all(isinstance(grid[k], int) for k in ("x", "y", "w", "h")), panel["title"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["y"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= GRID_WIDTH, f"wider than the grid: {panel['title']}"
        cells = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & taken, f"overlaps another panel: {panel['title']}"
        taken |= cells
    assert all(isinstance(i, int) for i in ids)
    assert len(set(ids)) == len(ids), f"repeated panel ids: {sorted(ids)}"


def test_every_expression_names_metrics_roost_exports() -> None:
    exported = exported_names()
    exprs = expressions(dashboard())
    assert exprs
    for expr in exprs:
        named = roost_names(expr)
        assert named, f"names no Roost metric: {expr}"
        assert named <= exported, f"not exported: {sorted(named - exported)} in {expr}"
        assert "$instance" in expr and "$job" in expr, f"ignores the job/instance variables: {expr}"


def test_every_exported_metric_has_a_panel() -> None:
    """A metric added to roost/core/metrics.py fails here until the dashboard shows it."""
    named = set().union(*(roost_names(expr) for expr in expressions(dashboard())))
    missing = sorted(family for family, samples in exported_families().items() if not samples & named)
    assert not missing, f"exported but on no panel of {DASHBOARD.name}: {missing}"
