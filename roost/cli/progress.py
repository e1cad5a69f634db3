"""Progress on a terminal for the commands that take a while.

Shown on stderr, and only when both stdout and stderr are terminals and no
``--json`` report was asked for: piped or redirected, a command prints exactly
what it printed before, so scripts read the same output. Every call is a
no-op when progress is off.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Any, TextIO

from tqdm import tqdm


def on_terminal(json_report: object = None) -> bool:
    """Whether to show progress: both streams are terminals and no ``--json`` was given."""
    return not json_report and sys.stdout.isatty() and sys.stderr.isatty()


class Progress:
    """One bar at a time on stderr: ``phase()`` starts the next one.

    A timed phase (``seconds=``) advances on its own with the wall clock, for
    loops that wait rather than count; a counted one moves with ``advance()``.
    """

    def __init__(self, command: str, enabled: bool) -> None:
        self.command = command
        self.enabled = enabled
        self._bar: Any = None
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def phase(
        self,
        name: str,
        *,
        total: float | None = None,
        unit: str = "it",
        seconds: float | None = None,
        scale: bool = False,
    ) -> None:
        """``scale``: show counts as k/M/G (binary, for bytes)."""
        self._end_phase()
        if not self.enabled:
            return
        bar_format = None  # tqdm's own: count, rate, time left
        if seconds is not None:
            total, unit = seconds, "s"
            bar_format = "{l_bar}{bar}| {n:.0f} of {total:.0f} s"
        elif total is None:
            bar_format = "{desc}: {elapsed}"
        self._bar = tqdm(
            total=total,
            unit=unit,
            desc=f"{self.command}: {name}",
            file=sys.stderr,
            leave=False,
            dynamic_ncols=True,
            bar_format=bar_format,
            unit_scale=scale,
            unit_divisor=1024 if scale else 1000,
        )
        if seconds is not None or total is None:
            self._stop.clear()
            self._ticker = threading.Thread(target=self._tick, args=(seconds is not None,), daemon=True)
            self._ticker.start()

    def advance(self, n: float = 1, **postfix: object) -> None:
        with self._lock:
            if self._bar is None:
                return
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)

    def _tick(self, timed: bool) -> None:
        began = time.monotonic()
        while not self._stop.wait(0.5):
            with self._lock:
                if self._bar is None:
                    return
                if timed:  # the elapsed seconds, capped at the phase's length
                    self._bar.update(min(self._bar.total, time.monotonic() - began) - self._bar.n)
                else:
                    self._bar.refresh()

    def _end_phase(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    def close(self) -> None:
        self._end_phase()

    @property
    def showing(self) -> bool:
        """A bar is on the terminal now."""
        return self._bar is not None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stdout_through_bars(self) -> contextlib.AbstractContextManager[object]:
        """While in it, lines printed to stdout go above the bar instead of into it."""
        if not self.enabled:
            return contextlib.nullcontext()
        return contextlib.redirect_stdout(_AboveBar(self, sys.stdout))

    def write_above(self, text: str, out: TextIO) -> None:
        """Write ``text`` to ``out`` with the bar taken off the terminal meanwhile."""
        with self._lock:
            if self._bar is not None:
                self._bar.clear()
            out.write(text)
            out.flush()
            if self._bar is not None:
                self._bar.refresh()


class _AboveBar:
    """A stdout that hands whole lines to ``Progress.write_above``."""

    def __init__(self, progress: Progress, out: TextIO) -> None:
        self.progress = progress
        self.out = out
        self.partial = ""

    def write(self, text: str) -> int:
        lines, newline, self.partial = (self.partial + text).rpartition("\n")
        if newline:
            self.progress.write_above(lines + newline, self.out)
        return len(text)

    def flush(self) -> None:
        if self.partial:
            self.progress.write_above(self.partial, self.out)
            self.partial = ""


class RetryLine:
    """``on_retry`` for the SDK: one line on stderr, rewritten in place, saying
    why the last connection attempt failed while the client retries (terminal only)."""

    def __init__(self, command: str, out: TextIO = sys.stderr) -> None:
        self.command = command
        self.out = out
        self.enabled = out.isatty()
        self.attempts = 0

    def __call__(self, url: str, reason: str, delay: float) -> None:
        self.attempts += 1
        if self.enabled:
            line = f"{self.command}: {url}: {reason}; retrying in {delay:.1f} s (attempt {self.attempts})"
            self.out.write("\r\x1b[K" + line)
            self.out.flush()

    def clear(self) -> None:
        """Remove the line (once connected, or before the final error)."""
        if self.enabled and self.attempts:
            self.out.write("\r\x1b[K")
            self.out.flush()
