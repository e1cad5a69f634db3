"""What a benchmark drives: an embedded server, a throwaway cluster, or existing URLs.

Common flags (``add_target_arguments``):

* default: embedded, one ``roost serve`` subprocess on a free port with a
  temporary data dir and ``--rate-limit 0`` (the load generator is not a
  phone: its many frames per connection must not be throttled), nor the caps
  on unauthenticated connections (all its thousands come from one address,
  and a storm's reconnects must measure the gateway, not the cap);
* ``--cluster N``: PostgreSQL + Redis + N gateways via ``DevCluster``;
* ``--url URL`` (repeatable) with ``--store DSN-or-data-dir``: an existing
  deployment; users are created directly in its store.

Users are created in bulk through the store (``add_users``): setting up
thousands of accounts must not take longer than the benchmark.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

from roost.cli.errors import UsageError
from roost.devcluster.embedded import EmbeddedServer, stop_process
from roost.devcluster.run import DevCluster, wait_healthy
from roost.store import accounts

SERVER_FLAGS = [
    *("--rate-limit", "0", "--log-level", "warning"),
    *("--max-unauthenticated", "0", "--max-unauthenticated-per-address", "0"),
]


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("target (default: an embedded server started for the run)")
    group.add_argument(
        "--cluster", type=int, default=0, metavar="N", help="start PostgreSQL + Redis + N gateways"
    )
    group.add_argument("--url", action="append", default=[], help="an existing gateway (repeatable)")
    group.add_argument("--store", default=None, help="with --url: postgresql://... or the SQLite data dir")
    group.add_argument(
        "--server-arg", action="append", default=[], help="extra flag for started servers (repeatable)"
    )
    group.add_argument(
        "--server-cpus",
        default=None,
        metavar="LIST",
        help="pin started servers (and the relay) to these CPUs, e.g. 0, and the load generator "
        "to the others (taskset); CPU time per message then compares across runs of a shared machine",
    )


# Kept under their old names for the bench modules that import them.
new_token = accounts.new_token
add_users_to_store = accounts.add_users


class Target:
    """Base: a set of gateway URLs and how to create users there."""

    name = "target"

    def __init__(self) -> None:
        self.urls: list[str] = []
        # Prefix for the run's user names: empty on a fresh server, random on an
        # existing deployment so that a second run does not collide with the first.
        self.user_tag = ""

    def start(self) -> None:
        """Start whatever this target owns (nothing for existing URLs)."""

    def stop(self) -> None:
        """Stop and delete whatever this target owns."""

    async def add_users(self, names: list[str]) -> dict[str, str]:
        raise NotImplementedError

    def server_pids(self) -> list[int]:
        """The gateway processes (for CPU and memory sampling); empty if not ours."""
        return []

    def backend_pids(self) -> list[int]:
        """Database / registry processes behind the gateways, if ours."""
        return []

    def kill_gateway(self, i: int) -> None:
        raise NotImplementedError(f"{self.name} does not own its gateways")

    def restart_gateway(self, i: int) -> str:
        raise NotImplementedError(f"{self.name} does not own its gateways")

    def describe(self) -> dict[str, Any]:
        return {"kind": self.name, "gateways": len(self.urls)}

    def __enter__(self) -> Target:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EmbeddedTarget(Target):
    """One ``roost serve`` (SQLite, in-process registry) on a free port, temp data dir."""

    name = "embedded"

    def __init__(self, extra_args: list[str] | None = None) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="roost-bench-"))
        self.server = EmbeddedServer(
            self.root / "data", self.root / "server.log", [*SERVER_FLAGS, *(extra_args or [])]
        )

    def start(self) -> None:
        self.server.start()
        self.urls = [self.server.url]

    def stop(self) -> None:
        self.server.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    async def add_users(self, names: list[str]) -> dict[str, str]:
        return await add_users_to_store(str(self.server.data_dir), names)

    def server_pids(self) -> list[int]:
        proc = self.server.proc
        return [proc.pid] if proc is not None and self.server.running else []

    def kill_gateway(self, i: int) -> None:
        assert i == 0 and self.server.proc is not None, "embedded has one gateway"
        self.server.kill()

    def restart_gateway(self, i: int) -> str:
        """Start the gateway again on the same port and data dir."""
        assert i == 0, "embedded has one gateway"
        self.server.stop()
        self.server.start()
        return self.server.url


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class ClusterTarget(Target):
    """PostgreSQL + Redis + N gateways (``DevCluster``), all throwaway."""

    name = "cluster"

    def __init__(self, gateways: int, extra_args: list[str] | None = None) -> None:
        super().__init__()
        self.cluster = DevCluster(gateways, extra_args=[*SERVER_FLAGS, *(extra_args or [])])

    def start(self) -> None:
        self.cluster.start()
        self.urls = list(self.cluster.urls)

    def stop(self) -> None:
        self.cluster.stop()

    async def add_users(self, names: list[str]) -> dict[str, str]:
        return await add_users_to_store(self.cluster.dsn, names)

    def server_pids(self) -> list[int]:
        return [proc.pid for _, proc in self.cluster.gateways if proc.poll() is None]

    def backend_pids(self) -> list[int]:
        pids: list[int] = []
        pg = self.cluster.pg
        if pg is not None:
            try:
                postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
                pids += [postmaster, *_children(postmaster)]
            except (OSError, ValueError, IndexError):
                pass
        redis = self.cluster.redis
        if redis is not None and redis.process is not None:
            pids.append(redis.process.pid)
        return pids

    def kill_gateway(self, i: int) -> None:
        self.cluster.kill_gateway(i)

    def restart_gateway(self, i: int) -> str:
        """Start gateway ``i`` again on its old port (after ``kill_gateway``)."""
        old_url, proc = self.cluster.gateways[i]
        stop_process(proc)
        url = self.cluster.start_gateway(i, port=int(old_url.rsplit(":", 1)[1]))
        self.urls[i] = url
        return url


class UrlTarget(Target):
    """An existing deployment: its URLs, and its store for creating users."""

    name = "url"

    def __init__(self, urls: list[str], store: str | None) -> None:
        super().__init__()
        self.urls = [u.rstrip("/") for u in urls]
        self.store = store
        self.user_tag = "b" + secrets.token_hex(3) + "-"

    def start(self) -> None:
        for url in self.urls:
            _check_healthy(url)

    async def add_users(self, names: list[str]) -> dict[str, str]:
        if not self.store:
            raise UsageError("--url needs --store (a DSN or the data dir) to create users")
        return await add_users_to_store(self.store, names)


def _check_healthy(url: str) -> None:
    import urllib.request

    with urllib.request.urlopen(url + "/healthz", timeout=5) as resp:
        if resp.status != 200:
            raise SystemExit(f"roost bench: {url} is not healthy ({resp.status})")


def make_target(args: argparse.Namespace) -> Target:
    """The target the common flags ask for (not started yet)."""
    extra = list(getattr(args, "server_arg", []) or [])
    if getattr(args, "url", None):
        return UrlTarget(args.url, args.store)
    if getattr(args, "cluster", 0):
        return ClusterTarget(args.cluster, extra)
    return EmbeddedTarget(extra)


__all__ = [
    "ClusterTarget",
    "EmbeddedTarget",
    "Target",
    "UrlTarget",
    "add_target_arguments",
    "add_users_to_store",
    "make_target",
    "wait_healthy",
]
