"""TLS on ``roost serve`` itself: https/wss with a private CA, a client that
does not trust the certificate refuses it, SIGHUP swaps the certificate for
new connections while open ones stay, and a stalled TLS handshake is closed.

Certificates are made here, at test time: a private CA and two server
certificates it signed (serial 1, then serial 2 for the reload)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from roost.client import CannotConnect, Client, Message
from tests.e2e.helpers import add_users, close_all, next_of
from tests.e2e.server import ServerProcess

HANDSHAKE_TIMEOUT = 1.0


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class PKI:
    dir: Path
    ca_key: ec.EllipticCurvePrivateKey
    ca_cert: x509.Certificate

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def cert(self) -> Path:
        return self.dir / "server.pem"

    @property
    def key(self) -> Path:
        return self.dir / "server.key"

    def issue(self, serial: int) -> None:
        """Write a server certificate for 127.0.0.1 (and its key) with ``serial``."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(f"roost test server {serial}"))
            .issuer_name(self.ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
            )
            .sign(self.ca_key, hashes.SHA256())
        )
        self.key.write_bytes(_pem_key(key))
        self.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def trust(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("roost test CA"))
        .issuer_name(_name("roost test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        .sign(ca_key, hashes.SHA256())
    )
    pki = PKI(tmp_path / "pki", ca_key, ca_cert)
    pki.dir.mkdir()
    pki.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    pki.issue(serial=1)
    return pki


@pytest.fixture
def server(pki: PKI, tmp_path: Path) -> Iterator[ServerProcess]:
    args = ["--tls-cert", str(pki.cert), "--tls-key", str(pki.key)]
    args += ["--handshake-timeout", str(HANDSHAKE_TIMEOUT)]
    srv = ServerProcess(tmp_path / "data", extra_args=args, tls=pki.trust())
    srv.start()
    yield srv
    srv.stop()


def served_serial(srv: ServerProcess, trust: ssl.SSLContext) -> int:
    """The serial number of the certificate a new connection is shown."""
    with (
        socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw,
        trust.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def test_sdk_with_ca_file_chats_over_wss(server: ServerProcess, pki: PKI, tmp_path: Path) -> None:
    tokens = add_users(server, ["alice", "bob"])
    wss = server.url.replace("https://", "wss://")
    alice = Client(wss, tokens["alice"], state_path=tmp_path / "a.state", ca_file=pki.ca_file)
    bob = Client(server.url, tokens["bob"], state_path=tmp_path / "b.state", ssl=pki.trust())
    try:
        await alice.connect(timeout=10)
        await bob.connect(timeout=10)
        sent = await asyncio.wait_for(alice.send("over tls", to="bob"), 10)
        msg = await next_of(bob, Message)
        assert (msg.id, msg.text) == (sent.message_id, "over tls")
    finally:
        await close_all(alice, bob)


async def test_client_without_the_ca_refuses_the_certificate(
    server: ServerProcess, pki: PKI, tmp_path: Path
) -> None:
    tokens = add_users(server, ["alice", "bob"])
    client = Client(server.url, tokens["alice"], state_path=tmp_path / "a.state", reconnect=False)
    with pytest.raises(CannotConnect) as refused:
        await client.connect(timeout=10)
    assert "TLS certificate not accepted" in str(refused.value)
    assert "certificate verify failed" in str(refused.value)

    # bob has run a client (over TLS, trusting the CA): his keys are on the server.
    bob = Client(server.url, tokens["bob"], state_path=tmp_path / "b.state", ca_file=pki.ca_file)
    await bob.connect(timeout=10)
    await asyncio.wait_for(bob.crypto.published.wait(), 20)
    await bob.close()

    # The CLI says the same in its one error line; with --ca-file it sends.
    send = [sys.executable, "-m", "roost.cli.main", "send", "--url", server.url, "--token", tokens["alice"],
            "--state", str(tmp_path / "cli.state"), "--to", "bob", "hi"]  # fmt: skip
    out = subprocess.run(send, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1, out.stderr
    assert "TLS certificate not accepted" in out.stderr
    out = subprocess.run([*send, "--ca-file", str(pki.ca_file)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert '"status": "sent"' in out.stdout


async def test_sighup_reloads_the_certificate_and_keeps_open_connections(
    server: ServerProcess, pki: PKI, tmp_path: Path
) -> None:
    tokens = add_users(server, ["alice", "bob"])
    trust = pki.trust()
    assert await asyncio.to_thread(served_serial, server, trust) == 1
    alice = Client(server.url, tokens["alice"], state_path=tmp_path / "a.state", ca_file=pki.ca_file)
    bob = Client(server.url, tokens["bob"], state_path=tmp_path / "b.state", ca_file=pki.ca_file)
    try:
        await alice.connect(timeout=10)
        await bob.connect(timeout=10)

        pki.issue(serial=2)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while (serial := await asyncio.to_thread(served_serial, server, trust)) != 2:
            assert time.monotonic() < deadline, f"new connections still see serial {serial}"
            await asyncio.sleep(0.05)

        # The sessions opened under the old certificate are the same ones, and work.
        sent = await asyncio.wait_for(alice.send("after the reload", to="bob"), 10)
        assert (await next_of(bob, Message)).id == sent.message_id
        assert (alice.connections, bob.connections) == (1, 1)

        # A broken pair is refused; the server goes on with the last good certificate.
        pki.key.write_text("not a key\n")
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "TLS certificate not reloaded" not in server.log():
            assert time.monotonic() < deadline, server.log()
            await asyncio.sleep(0.05)
        assert await asyncio.to_thread(served_serial, server, trust) == 2
        assert server.proc.poll() is None
    finally:
        await close_all(alice, bob)


def test_a_stalled_tls_handshake_is_closed_at_the_handshake_deadline(server: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=HANDSHAKE_TIMEOUT + 5) as raw:
        started = time.monotonic()
        assert raw.recv(1) == b""  # no ClientHello sent: the server closes, within the deadline
        assert time.monotonic() - started < HANDSHAKE_TIMEOUT + 3


def test_tls_flags_go_together(tmp_path: Path, pki: PKI) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "roost.cli.main", "serve", "--data-dir", str(tmp_path / "d"),
         "--tls-cert", str(pki.cert)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr == "roost serve: --tls-cert and --tls-key go together: give both or neither\n"
    assert not (tmp_path / "d").exists()
