"""Who may talk to a running ``roost app``: this machine's browser, with the run's secret.

The app listens on 127.0.0.1 only, but any local user's process and any web
page the user's browser opens can reach a loopback port. So every request
must carry the per-run secret (128+ bits, made at start, printed only in the
URL the app opens): the first load brings it in the query (``/?s=SECRET``);
the app answers with an HttpOnly, SameSite=Strict cookie and a redirect to
``/`` (so the secret leaves the address bar and history), and every later
request - pages, scripts, the WebSocket - must present that cookie.

Two more checks stop a web page from using the user's browser against the
app: the ``Host`` header must name the loopback address and port the app
listens on (a DNS-rebinding page sends its own host name), and an ``Origin``
header, when present, must be the app's own origin; the WebSocket and any
request that changes something (the file upload, a POST) must have one (a
browser always sends it there).
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Mapping

SECRET_BYTES = 32  # 256 bits
SECRET_PARAM = "s"
LOOPBACK_NAMES = ("127.0.0.1", "localhost")


def new_secret() -> str:
    return secrets.token_urlsafe(SECRET_BYTES)


def cookie_name(port: int) -> str:
    """Per port: cookies are not separated by port, and two apps (two accounts) may run at once."""
    return f"roost_app_{port}"


class Guard:
    def __init__(self, secret: str, port: int) -> None:
        self.secret = secret
        self.port = port
        self.cookie = cookie_name(port)
        self.hosts = {f"{name}:{port}" for name in LOOPBACK_NAMES}
        self.origins = {f"http://{host}" for host in self.hosts}

    def matches(self, candidate: str | None) -> bool:
        """``candidate`` is this run's secret (compared in constant time)."""
        if not candidate:
            return False
        return hmac.compare_digest(candidate.encode(), self.secret.encode())

    def host_ok(self, host: str | None) -> bool:
        return host is not None and host.lower() in self.hosts

    def origin_ok(self, origin: str | None, *, required: bool) -> bool:
        if origin is None:
            return not required
        return origin.lower() in self.origins

    def refusal(
        self,
        *,
        host: str | None,
        origin: str | None,
        cookies: Mapping[str, str],
        query_secret: str | None,
        websocket: bool,
        changes: bool = False,
    ) -> str | None:
        """Why a request is refused, or None if it may go on.

        ``changes``: a request that acts (an upload): like the WebSocket, it
        needs the app's Origin and the cookie. The query secret is accepted
        only for a page load, so it is never needed past the first load."""
        strict = websocket or changes
        if not self.host_ok(host):
            return "wrong Host (only this machine's loopback address is served)"
        if not self.origin_ok(origin, required=strict):
            return "wrong Origin (only the app's own page may connect)"
        if self.matches(cookies.get(self.cookie)):
            return None
        if not strict and self.matches(query_secret):
            return None
        return "the app's secret is missing or wrong (open the URL roost app printed)"
