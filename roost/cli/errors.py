"""Exit codes shared by every ``roost`` command (README.md has the table)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # the work failed: refused by the server, unreachable, a check found a violation
EXIT_USAGE = 2  # the command cannot run as given: flags, URL, token, message; argparse uses 2 too
EXIT_WAIT_TIMED_OUT = 3  # roost send --wait delivered|read: stored (✓), but not reached in --timeout
# roost send: not stored by the server within --timeout; kept in the durable
# outbox and sent, with the same id, by the next client of the account.
EXIT_QUEUED = 4
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)


class UsageError(Exception):
    """A one-line reason the command cannot run as given; ``roost`` prints it and exits 2."""
