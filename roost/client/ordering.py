"""Client-side ordering and dedupe for one conversation. Pure, no I/O.

The server numbers each conversation's messages 1, 2, 3, ... The client keeps
``have``: every seq up to it is known (shown to the user, or sent by this
device). A message at ``have + 1`` is released at once, along with whatever
was buffered behind it; a later one waits in the buffer and the gap is
reported so the caller can fetch it from history; an older or already
buffered one is a duplicate and is dropped. This is what makes an
at-least-once wire look exactly-once and in order to the application.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(slots=True)
class Accepted(Generic[T]):
    released: list[tuple[int, T | None]]  # (seq, item) in order; None for own seqs
    gap: tuple[int, int] | None  # (first missing seq, highest seq buffered) if any


@dataclass(slots=True)
class ConversationOrder(Generic[T]):
    have: int = 0
    buffer: dict[int, T | None] = field(default_factory=dict)

    def accept(self, seq: int, item: T | None) -> Accepted[T]:
        """Take a message (``item``) or an own seq (``item=None``) at ``seq``."""
        if seq <= self.have or seq in self.buffer:
            return Accepted([], self.gap())
        self.buffer[seq] = item
        released: list[tuple[int, T | None]] = []
        while self.have + 1 in self.buffer:
            self.have += 1
            released.append((self.have, self.buffer.pop(self.have)))
        return Accepted(released, self.gap())

    def skip_to(self, seq: int) -> list[tuple[int, T | None]]:
        """Everything up to ``seq`` is known not to concern this device (e.g. it
        joined a group then): release what is buffered at or below it."""
        released = []
        if seq > self.have:
            for s in sorted(k for k in self.buffer if k <= seq):
                released.append((s, self.buffer.pop(s)))
            self.have = seq
        while self.have + 1 in self.buffer:
            self.have += 1
            released.append((self.have, self.buffer.pop(self.have)))
        return released

    def gap(self) -> tuple[int, int] | None:
        if not self.buffer:
            return None
        return self.have + 1, max(self.buffer)
