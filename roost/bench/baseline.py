"""baseline: the bare relay alone (Roost's frames, no persistence, no logic), stepped like one-to-one.

The same clients, steps and figures as ``one-to-one``, against
``roost.bench.relay`` instead of Roost: the machine's limit for carrying
Roost's frames with the same WebSocket library and codec. The target flags
are ignored: the relay is always started for the run. ``roost bench
one-to-one --with-baseline`` runs both in one run and reports their ratio.
"""

from __future__ import annotations

import argparse
from typing import Any

from roost.bench.one_to_one import add_step_arguments, run_steps


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_step_arguments(parser)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from roost.bench.relay import RelayTarget

    return run_steps(RelayTarget(), args)
