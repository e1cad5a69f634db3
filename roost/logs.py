"""Logs on stderr: one JSON object per line, or a console line for humans.

Every line logged while serving a connection carries that connection's id
(``conn``): the gateway sets it in a context variable when the socket
arrives, and asyncio copies the context into everything that handler runs.
"""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import secrets
import sys
import time
from typing import Any

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

CONNECTION_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "roost_connection_id", default=None
)


# Connection ids count up from a random start per process: unique within a
# gateway (for 2**32 connections), apart across gateways but for a chance
# collision, and without a getrandom() call per connection.
_connection_ids = itertools.count(secrets.randbits(32))


def new_connection_id() -> str:
    """A fresh id (8 hex digits) for the connection the current task serves."""
    conn_id = f"{next(_connection_ids) & 0xFFFFFFFF:08x}"
    CONNECTION_ID.set(conn_id)
    return conn_id


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    extra = {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}
    conn_id = CONNECTION_ID.get()
    if conn_id is not None:
        extra.setdefault("conn", conn_id)
    return extra


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(time.time(), 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_fields(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class ConsoleFormatter(logging.Formatter):
    """``12:00:01.234 INFO  roost.gateway connected user=alice conn=1a2b3c4d``"""

    def format(self, record: logging.LogRecord) -> str:
        when = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        pairs = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{when} {record.levelname:<5} {record.name} {record.getMessage()}"
        if pairs:
            line += " " + pairs
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def default_format() -> str:
    """console on a terminal, json otherwise (a service manager, a file, a pipe)."""
    return "console" if sys.stderr.isatty() else "json"


def setup_logging(level: str = "info", fmt: str | None = None) -> None:
    fmt = fmt or default_format()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ConsoleFormatter() if fmt == "console" else JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
