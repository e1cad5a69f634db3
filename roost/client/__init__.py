"""The Python SDK: ``from roost.client import Client``."""

from roost.client.blobs import BlobTransferError
from roost.client.client import (
    CannotConnect,
    Client,
    ConnectionLost,
    EmptyMessage,
    GroupInfo,
    InvalidArgument,
    InvalidMessage,
    MessageTooLarge,
    RoostError,
    SendResult,
)
from roost.client.events import (
    Connected,
    Consumed,
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
    "BlobTransferError",
    "CannotConnect",
    "Client",
    "Connected",
    "ConnectionLost",
    "Consumed",
    "Disconnected",
    "EmptyMessage",
    "ErrorEvent",
    "Event",
    "GroupInfo",
    "InvalidArgument",
    "InvalidMessage",
    "LocalSend",
    "Membership",
    "Message",
    "MessageTooLarge",
    "PresenceEvent",
    "ReceiptEvent",
    "RoostError",
    "SendResult",
    "Sent",
    "StateInUse",
    "TypingEvent",
]
