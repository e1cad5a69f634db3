"""TLS on the gateway's own listener (``roost serve --tls-cert/--tls-key``).

One ``ssl.SSLContext`` serves every connection. On SIGHUP the certificate and
key are read again into that same context: OpenSSL copies a context's
certificate into each connection when the connection is created, so open
connections keep the certificate they were made with and only new handshakes
see the new one. The files are first loaded into a scratch context, so a bad
or half-written pair is refused with the live context untouched.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

log = logging.getLogger("roost.gateway")


class TLSConfigError(ValueError):
    """The certificate or key cannot be used; the message says which and why."""


def _load(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    for what, path in (("certificate", cert), ("key", key)):
        try:
            path.read_bytes()
        except OSError as exc:
            raise TLSConfigError(f"cannot read the TLS {what} {path}: {exc.strerror or exc}") from None
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        # OpenSSL's own words ("PEM lib") do not say which file is wrong.
        raise TLSConfigError(
            f"cannot use TLS certificate {cert} with key {key}: not PEM, or the key does not "
            f"match the certificate ({exc.reason or exc})"
        ) from None


def _new_context() -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class ServerTLS:
    """The listener's TLS context and the files it is (re)loaded from."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert = cert
        self.key = key
        self.context = _new_context()
        _load(self.context, cert, key)

    def reload(self) -> bool:
        """Read the files again for new connections; False (logged) if refused."""
        try:
            _load(_new_context(), self.cert, self.key)  # check first: the live context stays whole
            _load(self.context, self.cert, self.key)
        except TLSConfigError as exc:
            log.error("TLS certificate not reloaded, still serving the previous one: %s", exc)
            return False
        log.info("TLS certificate reloaded", extra={"cert": str(self.cert)})
        return True
