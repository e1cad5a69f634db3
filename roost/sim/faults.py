"""The fault kinds the simulator can inject (kept import-free for the CLI)."""

from __future__ import annotations

FAULT_KINDS = (
    "cut",  # a connection resets mid-stream: frames in flight are lost
    "partition",  # a connection is blackholed, then its heartbeats give up
    "client-crash",  # the app is killed: uncommitted local state is lost, it restarts on its state
    "server-kill",  # every gateway is killed at once (the embedded server, or a whole cluster)
    "store-fail",  # the next batches fail (I/O error) at BEGIN, inside, or at COMMIT
    "store-crash",  # the database dies before committing its batch, restarts with what it had
    "gateway-kill",  # one gateway is killed; the others keep their sessions
    "store-crash-after-commit",  # the database dies after committing, before answering
    "registry-restart",  # the router forgets every route; gateways restore them and resync
    "registry-stale",  # one user's route is silently lost for a while
    "store-fail-at-commit",  # the next batches fail at COMMIT itself: nothing durable
    "writer-crash",  # the writer hits an unexpected error before BEGIN or after COMMIT (answer lost)
    "store-read-fail",  # half of the store reads fail for a while
    "store-slow-reads",  # store reads answer 5-80 ms after their snapshot for a while
)
# Every kind is on by default. store-crash-after-commit and registry-stale
# were off while they found open gaps (docs/simulation.md, "What it found");
# both gaps are fixed.
DEFAULT_FAULTS = FAULT_KINDS
