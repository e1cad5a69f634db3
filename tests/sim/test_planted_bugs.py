"""Every delivery invariant of docs/reliability.md, broken on purpose in the
real code (tests/sim/plants.py), must be reported by the simulator within a
stated number of seeds; the clean code passes those very seeds
(``test_simulator.py`` runs seeds 0..CI_SEEDS-1 with the same faults).

``WITHIN`` is the stated budget: the simulator runs seeds 0, 1, 2, ... of
the default fault mix and must report one of the plant's violation kinds
before that many. The first catching seed (measured when the budget was set,
docs/simulation.md) is in the comment; a search stops there, so the whole
file costs about as many runs as the sum of those seeds (~590, ~2.5 min).
"""

from __future__ import annotations

import pytest

from roost.sim.faults import DEFAULT_FAULTS
from roost.sim.world import run_seed

from .plants import PLANTS
from .test_simulator import CI_SEEDS

ANY_LOSS = frozenset({"lost", "duplicate", "phantom", "gap", "reordered", "missing_receipt"})

# plant -> (seeds it must be caught within, the violation kinds that count)
WITHIN: dict[str, tuple[int, frozenset[str]]] = {
    "ack-before-commit": (20, ANY_LOSS),  # seed 3; the old simulator missed it in 2,000
    "ack-as-each-op-runs": (20, ANY_LOSS),  # seed 3
    "inbox-entry-removed-at-push": (20, frozenset({"lost", "missing_receipt"})),  # seed 1
    "drain-before-register": (200, frozenset({"lost"})),  # seed 108; the old simulator missed it in 2,000
    "lookup-before-persist": (60, frozenset({"lost"})),  # seed 23
    "unread-inbox-not-retried": (200, frozenset({"lost"})),  # seed 93 since one read at connect (6 before)
    "failed-drain-dropped": (50, frozenset({"lost"})),  # seed 22
    "failed-batch-keeps-streams": (325, frozenset({"reordered"})),  # seed 323 since encryption (94 before)
    "rolled-back-seqs-kept": (20, frozenset({"gap"})),  # seed 3
    "no-idempotent-append": (20, frozenset({"duplicate"})),  # seed 1
    "marks-move-back": (30, frozenset({"mark_backwards"})),  # seed 6
}


def first_catch(budget: int, kinds: frozenset[str]) -> tuple[int, list[str]]:
    """The first seed below ``budget`` whose run reports one of ``kinds``
    (-1 if none did), and what that run reported."""
    for seed in range(budget):
        result = run_seed(seed, DEFAULT_FAULTS)
        reported = sorted({v.kind for v in result.unexplained})
        if kinds & set(reported):
            return seed, reported
    return -1, []


def test_every_plant_has_a_budget_within_the_clean_seeds() -> None:
    assert set(WITHIN) == set(PLANTS)
    # The clean code passes every seed a plant may use (test_simulator runs them).
    assert max(budget for budget, _ in WITHIN.values()) <= CI_SEEDS


# End-to-end encryption made a simulated run ~10x dearer (~0.3 s of CPU: key
# generation, PQXDH, signatures); a budget of 200 seeds no longer fits in the
# suite's default 120 s on a slow machine.
@pytest.mark.timeout(480)
@pytest.mark.parametrize("name", sorted(PLANTS))
def test_the_simulator_reports_the_planted_bug(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    plant = PLANTS[name]
    budget, kinds = WITHIN[name]
    plant.apply(monkeypatch)
    seed, reported = first_catch(budget, kinds)
    assert seed >= 0, f"{name} ({plant.invariant}) went unseen for {budget} seeds"
    print(f"{name} ({plant.invariant}): caught at seed {seed}, reported {reported}")
