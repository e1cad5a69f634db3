"""An asyncio event loop on a virtual clock.

``time()`` returns simulated seconds. The selector never blocks: asked to
wait ``timeout`` seconds for I/O, it polls without waiting and moves the
clock forward by ``timeout`` instead, which is exactly the time of the next
timer. So every ``asyncio.sleep``, ``call_later`` and ``wait_for`` runs at
once, in the order of their virtual deadlines, and ready callbacks run in
FIFO order as in any asyncio loop: a run is a pure function of its inputs.
(The same idea as ``looptime`` and trio's ``MockClock`` with autojump.)
"""

from __future__ import annotations

import asyncio
import selectors
from typing import Any


class StalledError(RuntimeError):
    """Nothing is ready and no timer is due: the simulated world is stuck."""


class _JumpingSelector(selectors.DefaultSelector):
    def __init__(self, clock: VirtualClockLoop) -> None:
        super().__init__()
        self._clock = clock

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is None:
            raise StalledError("the event loop would wait forever: no timer and nothing ready")
        events = super().select(0)  # the loop's self-pipe only; never a wait
        if timeout > 0 and not events:
            self._clock.advance(timeout)
        return events


class VirtualClockLoop(asyncio.SelectorEventLoop):
    def __init__(self, start: float = 0.0) -> None:
        self._virtual_now = start
        super().__init__(_JumpingSelector(self))
        # The loop runs a timer when it is due within this resolution; keep it
        # tiny so the order of close deadlines is exact.
        self._clock_resolution = 1e-9

    def time(self) -> float:
        return self._virtual_now

    def advance(self, seconds: float) -> None:
        self._virtual_now += seconds
