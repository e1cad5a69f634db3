"""The record of one simulated run: every event with its virtual time.

Events are kept raw (frames as bytes) and only described when printed, so
recording costs little; a failing run prints the events that touch the
conversations and users of its violations, oldest first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import msgspec

from roost.protocol import frames as f
from roost.protocol.codec import decode_client, decode_server
from roost.verify.history import Violation

FAULTS = frozenset(
    {
        "cut",
        "partition",
        "client-crash",
        "gateway-kill",
        "server-kill",
        "gateway-up",
        "store-fail",
        "commit-failed",
        "writer-crash",
        "read-fail",
        "slow-reads",
        "store-crash",
        "store-up",
        "registry-lost",
        "registry-up",
        "registry-stale",
    }
)
LINKS = frozenset(
    {"connected", "disconnected", "close", "server-close", "client-up", "registered", "inbox-read"}
)


@dataclass(slots=True)
class Event:
    t: float
    kind: str
    who: str  # the user (or gateway) it concerns, "" for the whole system
    detail: str | bytes  # bytes: a frame on the wire, described when printed


@dataclass(slots=True)
class Trace:
    events: list[Event] = field(default_factory=list)
    now: float = 0.0

    def add(self, t: float, kind: str, who: str, detail: str | bytes) -> None:
        self.events.append(Event(t, kind, who, detail))

    def lines(self) -> list[str]:
        return [describe(e) for e in self.events]


def _frame_text(kind: str, data: bytes) -> str:
    try:
        frame = decode_server(data) if kind == "recv" else decode_client(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return f"undecodable {data[:60]!r}"
    match frame:
        case f.Deliver():
            return f"msg {frame.conv}#{frame.seq} id={frame.id} from={frame.sender or '(system)'}"
        case f.SendAck():
            dup = " duplicate" if frame.duplicate else ""
            return f"ack id={frame.id} -> {frame.conv}#{frame.seq}{dup}"
        case f.Receipt():
            marks = " ".join(f"{u}={m.delivered}/{m.read}" for u, m in sorted(frame.marks.items()))
            return f"receipt {frame.conv} rv={frame.rv} {marks} all={frame.all_delivered}/{frame.all_read}"
        case f.Send():
            return f"send id={frame.id} to={frame.to or frame.conv}"
        case f.DeliveryAck():
            return f"dack {frame.conv}#{frame.seq}"
        case f.ReadMarker():
            return f"read {frame.conv}#{frame.seq}"
        case f.ReceiptAck():
            return f"rack {frame.conv} rv={frame.rv}"
        case f.HistoryRequest():
            return f"history {frame.conv} after={frame.after}"
        case f.HistoryPage():
            seqs = ",".join(str(m.seq) for m in frame.messages)
            return f"history_page {frame.conv} [{seqs}] first={frame.first_seq} last={frame.last_seq}"
        case f.Error():
            return f"error {frame.code} ref={request_ref(frame.ref)} {frame.message}"
        case f.Auth():
            return "auth"
        case f.Welcome():
            return "welcome"
        case f.GroupState():
            return f"group {frame.group} members={','.join(frame.members)}"
    return type(frame).__name__


_RANDOM_REF = re.compile(r"(fill-)?[0-9a-f]{12,32}")


def request_ref(ref: str) -> str:
    # The SDK names its requests with random uuids: not part of a replay.
    return "(request)" if _RANDOM_REF.fullmatch(ref) else ref


def describe(event: Event) -> str:
    detail = event.detail
    if isinstance(detail, bytes):
        # "recv": a frame reached the client; "xmit": a frame reached the
        # server; "lost-...": the connection was down and the frame vanished.
        arrow = "<-" if event.kind.endswith("recv") else "->"
        lost = "LOST " if event.kind.startswith("lost-") else ""
        text = _frame_text(event.kind.removeprefix("lost-"), detail)
        return f"{event.t:10.6f}  {event.who:<6} {arrow} {lost}{text}"
    return f"{event.t:10.6f}  {event.who:<6} {event.kind}: {detail}"


_MESSAGE_ID = re.compile(r"\b[a-z][a-z0-9_.]*-\d+\b")  # the simulator's ids: sender-index


def relevant(trace: Trace, violations: list[Violation], users: set[str], limit: int = 80) -> list[str]:
    """The story of the first violations, oldest first: every event that names
    their messages (by conv#seq or by client id), and around them the faults
    and the involved users' connections and frames of those conversations."""
    shown = violations[:3]
    convs = {v.conv for v in shown if v.conv}
    pattern = "|".join(
        [re.escape(f"{v.conv}#{v.seq}") + r"\b" for v in shown if v.conv]
        + [r"\b" + re.escape(cid) + r"\b" for v in shown for cid in _MESSAGE_ID.findall(v.detail)]
    )
    if not pattern:
        return [describe(e) for e in trace.events][-limit:]
    names = re.compile(pattern)
    texts = [(e, describe(e)) for e in trace.events]
    times = [e.t for e, text in texts if names.search(text)]
    if not times:
        return [text for e, text in texts if _touches(e, text, convs, users)][-limit:]
    start, end = min(times) - 0.5, max(times) + 2.0
    story = [
        text
        for e, text in texts
        if names.search(text) or (start <= e.t <= end and _touches(e, text, convs, users))
    ]
    return story[:limit]


def _touches(event: Event, text: str, convs: set[str], users: set[str]) -> bool:
    if event.kind in FAULTS:
        return True
    mentions = any(c in text for c in convs)
    if event.who in users:
        return event.kind in LINKS or mentions or not convs
    return False
