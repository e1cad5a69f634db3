"""``roost bench``: load generators and benchmarks.

Each scenario is a module in this package with two functions:

* ``add_arguments(parser)``: the scenario's own flags;
* ``run(args) -> dict``: runs the scenario and returns its figures under
  stable keys (``rate_achieved``, ``p50_ms``, ``p99_ms``, ``p999_ms``,
  ``kib_per_connection``, ...). Stepped scenarios return ``{"steps": [...]}``.

``roost.bench.cli`` adds the common flags (``--json FILE``, ``--plot DIR``),
the machine description and the report around them.
"""

from __future__ import annotations

# scenario name -> module (imported lazily: a scenario's dependencies load only when it runs)
SCENARIOS: dict[str, str] = {
    "one-to-one": "roost.bench.one_to_one",
    "offline-drain": "roost.bench.offline_drain",
    "group-fanout": "roost.bench.group_fanout",
    "baseline": "roost.bench.baseline",
    "idle-connections": "roost.bench.idle",
    "reconnect-storm": "roost.bench.storm",
    "media": "roost.bench.media",
    "e2ee": "roost.bench.e2ee",
}
