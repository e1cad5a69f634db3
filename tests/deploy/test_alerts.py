"""deploy/prometheus/alerts.yml names only metrics Roost exports."""

from __future__ import annotations

import re
from pathlib import Path

from tests.deploy.metric_names import exported_names, roost_names

ALERTS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"


def expressions() -> list[str]:
    return [m.group(1) for m in re.finditer(r"^\s*expr:\s*(.+)$", ALERTS.read_text(), re.MULTILINE)]


def test_every_alert_has_an_expression() -> None:
    alerts = re.findall(r"^\s*- alert:", ALERTS.read_text(), re.MULTILINE)
    assert len(alerts) == len(expressions()) >= 3


def test_every_expression_names_metrics_roost_exports() -> None:
    exported = exported_names()
    for expr in expressions():
        named = roost_names(expr)
        assert named, f"names no Roost metric: {expr}"
        assert named <= exported, f"not exported: {sorted(named - exported)} in {expr}"
