"""deploy/prometheus/alerts.yml names only metrics Roost exports."""

from __future__ import annotations

import re
from pathlib import Path

from roost.core.metrics import Metrics

ALERTS = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"


def exported_names() -> set[str]:
    """Every sample name a gateway's /metrics carries (with _bucket, _sum, ...)."""
    return {sample.name for family in Metrics().registry.collect() for sample in family.samples}


def expressions() -> list[str]:
    return [m.group(1) for m in re.finditer(r"^\s*expr:\s*(.+)$", ALERTS.read_text(), re.MULTILINE)]


def test_every_alert_has_an_expression() -> None:
    alerts = re.findall(r"^\s*- alert:", ALERTS.read_text(), re.MULTILINE)
    assert len(alerts) == len(expressions()) >= 3


def test_every_expression_names_metrics_roost_exports() -> None:
    exported = exported_names()
    for expr in expressions():
        named = set(re.findall(r"\broost_[a-z0-9_]+", expr))
        assert named, f"names no Roost metric: {expr}"
        assert named <= exported, f"not exported: {sorted(named - exported)} in {expr}"
