"""The metric names Roost exports and the ones a PromQL expression names.

Shared by the checks of deploy/prometheus/alerts.yml and deploy/grafana/roost.json.
Both read the names from ``roost.core.metrics.Metrics`` at test time, so a metric
added there is known to them without editing these tests.
"""

from __future__ import annotations

import re

from roost.core.metrics import Metrics

_ROOST_NAME = re.compile(r"\broost_[a-z0-9_]+")


# The sample names each metric type shows on /metrics, by suffix. Taken from the
# type, not from collected samples: a labelled metric with no child yet (frames
# by type before the first frame) has no sample but is exported all the same.
_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
}


def exported_families() -> dict[str, set[str]]:
    """Each exported metric (family name) with the sample names a query may use.

    A counter ``roost_x_total`` is the family ``roost_x`` with the sample
    ``roost_x_total``; a histogram has ``_bucket``, ``_sum`` and ``_count``.
    The ``_created`` timestamps are left out: no query is about them.
    """
    return {
        family.name: {family.name + suffix for suffix in _SUFFIXES[family.type]}
        for family in Metrics().registry.collect()
    }


def exported_names() -> set[str]:
    """Every sample name a gateway's /metrics carries (with _bucket, _sum, ...)."""
    return set().union(*exported_families().values())


def roost_names(expr: str) -> set[str]:
    """The Roost metric names a PromQL expression reads."""
    return set(_ROOST_NAME.findall(expr))
