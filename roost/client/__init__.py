"""The Python SDK: ``from roost.client import Client``."""

from roost.client.client import Client, ConnectionLost, GroupInfo, RoostError, SendResult
from roost.client.events import (
    Connected,
    Disconnected,
    ErrorEvent,
    Event,
    LocalSend,
    Membership,
    Message,
    PresenceEvent,
    ReceiptEvent,
    Sent,
    TypingEvent,
)
from roost.client.state import StateInUse

__all__ = [
    "Client",
    "Connected",
    "ConnectionLost",
    "Disconnected",
    "ErrorEvent",
    "Event",
    "GroupInfo",
    "LocalSend",
    "Membership",
    "Message",
    "PresenceEvent",
    "ReceiptEvent",
    "RoostError",
    "SendResult",
    "Sent",
    "StateInUse",
    "TypingEvent",
]
