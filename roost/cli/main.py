"""The ``roost`` command.

Sub-commands and flags below are a contract other tools rely on; keep them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

from roost import __version__
from roost.cli.errors import EXIT_INTERRUPTED, EXIT_USAGE, UsageError


def _at_least_zero(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def _milliseconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of milliseconds: {text!r}") from None
    if not 0 <= value <= 1000:  # NaN too
        raise argparse.ArgumentTypeError("must be from 0 to 1000 ms")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:  # NaN too
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def _non_negative_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value < float("inf"):  # NaN too
        raise argparse.ArgumentTypeError("must be 0 seconds or more")
    return value


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the server (embedded: SQLite + in-process registry)")
    # Every other flag can also come from this file or ROOST_<FLAG> (roost/cli/serve_config.py).
    p.add_argument("--config", default=None, help="a TOML file of settings (also ROOST_CONFIG)")
    p.add_argument(
        "--print-config", action="store_true", help="print the effective settings as TOML and exit"
    )
    p.add_argument("--data-dir", default="roost-data", help="where the database lives")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument(
        "--tls-cert", default=None, help="PEM certificate chain: serve https:// and wss:// (with --tls-key)"
    )
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert; SIGHUP reloads both")
    p.add_argument(
        "--store", default=None, help="cluster mode: postgresql://... (default: SQLite in --data-dir)"
    )
    p.add_argument("--registry", default=None, help="cluster mode: redis://... (default: in-process)")
    p.add_argument("--gateway-id", default="", help="cluster mode: this gateway's unique name")
    p.add_argument("--heartbeat", type=float, default=30.0, help="WebSocket ping interval (s)")
    p.add_argument("--auth-timeout", type=float, default=10.0, help="upgrade -> auth frame (s)")
    p.add_argument(
        "--handshake-timeout",
        type=_seconds,
        default=15.0,
        help="accept -> authenticated session, covering request, upgrade and auth (s)",
    )
    p.add_argument(
        "--max-unauthenticated",
        type=_at_least_zero,
        default=None,
        help="connections not yet authenticated, per gateway (default: a quarter of the open-file "
        "limit, at most 1024); at the cap the oldest (>= 1 s) is closed for a new one, else it "
        "gets 503 (0: no cap)",
    )
    p.add_argument(
        "--max-unauthenticated-per-address",
        type=_at_least_zero,
        default=64,
        help="... from one source address (an IPv6 /64); more get 429 (0: no cap)",
    )
    p.add_argument(
        "--commit-interval-ms",
        type=_milliseconds,
        default=3.0,  # roost.store.sqlite.COMMIT_INTERVAL_SECONDS (a test keeps them equal)
        help="embedded store under load: least time between two commits' starts, so that each "
        "carries more messages (less CPU per message, at most this much added latency; 0: off)",
    )
    p.add_argument("--rate-limit", type=float, default=500.0, help="frames/s per connection (0: off)")
    p.add_argument("--max-group-members", type=int, default=1024)
    p.add_argument("--window", type=int, default=128, help="unacked messages per device")
    p.add_argument("--presence-debounce", type=float, default=3.0)
    p.add_argument(
        "--admin-port",
        type=int,
        default=None,
        help="serve Prometheus /metrics on this port (a listener apart from --port; default: off)",
    )
    p.add_argument("--admin-host", default="127.0.0.1", help="address of the --admin-port listener")
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--log-format",
        choices=("json", "console"),
        default=None,
        help="json: one object per line; console: for humans (default: console on a terminal, else json)",
    )
    p.add_argument(
        "--drain-seconds",
        type=_non_negative_seconds,
        default=5.0,
        help="on SIGTERM, /readyz turns 503 and open sockets close with 1001 spread over this (0: at once)",
    )
    _add_media_flags(p)
    p.set_defaults(func=_serve)


def _byte_size(text: str) -> int:
    from roost.media.config import byte_size

    try:
        value = byte_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return value


def _add_media_flags(p: argparse.ArgumentParser) -> None:
    """Media (attachments): where blobs go, their limits and how long they stay
    (docs/deploy.md, "Media"). Byte sizes take binary units: 16MiB, 2GiB."""
    from roost.media.config import MediaConfig, MediaLimits

    media, limits = MediaConfig(), MediaLimits()
    p.add_argument(
        "--media",
        default=None,
        help="where blobs go: a directory, or s3://bucket[/prefix]?endpoint=http://host:port&region=R "
        "(default: <data-dir>/media, served by this server)",
    )
    p.add_argument("--s3-access-key", default="", help="S3 credentials (else the AWS_* environment)")
    p.add_argument("--s3-secret-key", default="", help="... its secret (better: ROOST_S3_SECRET_KEY)")
    p.add_argument(
        "--media-secret-file",
        default=None,
        help="local blobs: the URL-signing key (made, 0600, if absent; default <data-dir>/media.key); "
        "gateways sharing a media directory share it",
    )
    p.add_argument(
        "--media-public-url",
        default="",
        help="local blobs: the public base of /media URLs, e.g. behind a CDN (default: this server's)",
    )
    p.add_argument("--media-part-size", type=_byte_size, default=media.part_size, help="upload part size")
    p.add_argument("--media-url-ttl", type=int, default=media.url_ttl, help="signed URLs live this long (s)")
    for kind in ("image", "video", "audio", "file"):
        p.add_argument(
            f"--media-max-{kind}",
            type=_byte_size,
            default=getattr(limits, f"{kind}_bytes"),
            help=f"largest {kind} blob",
        )
    p.add_argument(
        "--media-quota", type=_byte_size, default=limits.quota_bytes, help="bytes stored per user (0: none)"
    )
    p.add_argument(
        "--media-uploads-per-minute",
        type=float,
        default=limits.uploads_per_minute,
        help="uploads a user may start per minute, per gateway (0: no limit)",
    )
    p.add_argument(
        "--media-retention-days",
        type=float,
        default=limits.retention_days,
        help="complete blobs are deleted this long after upload",
    )
    p.add_argument(
        "--media-pending-hours",
        type=float,
        default=limits.pending_hours,
        help="uploads never completed are deleted after this",
    )
    p.add_argument(
        "--media-sweep-interval",
        type=_seconds,
        default=media.sweep_interval,
        help="seconds between deletion sweeps",
    )


def media_config(args: argparse.Namespace) -> Any:
    """The ``MediaConfig`` of ``roost serve``'s settings."""
    from roost.media.config import MediaConfig, MediaLimits

    return MediaConfig(
        location=args.media or None,
        secret_file=Path(args.media_secret_file) if args.media_secret_file else None,
        part_size=args.media_part_size,
        url_ttl=args.media_url_ttl,
        public_url=args.media_public_url,
        s3_access_key=args.s3_access_key,
        s3_secret_key=args.s3_secret_key,
        sweep_interval=args.media_sweep_interval,
        limits=MediaLimits(
            image_bytes=args.media_max_image,
            video_bytes=args.media_max_video,
            audio_bytes=args.media_max_audio,
            file_bytes=args.media_max_file,
            quota_bytes=args.media_quota,
            uploads_per_minute=args.media_uploads_per_minute,
            retention_days=args.media_retention_days,
            pending_hours=args.media_pending_hours,
        ),
    )


def _serve(args: argparse.Namespace) -> int:
    from roost.gateway.admission import AdmissionLimits, default_max_pending
    from roost.gateway.server import GatewayConfig, serve
    from roost.gateway.tls import TLSConfigError
    from roost.logs import setup_logging
    from roost.service.chat import ServiceConfig
    from roost.store.datadir import DataDirError, ServerLock

    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together: give both or neither")
    from roost.media.config import check_location

    try:
        check_location(args.media)
    except ValueError as exc:
        raise UsageError(f"--media: {exc}") from None
    setup_logging(args.log_level, args.log_format)
    max_pending = args.max_unauthenticated
    if max_pending is None:
        max_pending = default_max_pending()
    config = GatewayConfig(
        data_dir=Path(args.data_dir),
        store_url=args.store,
        registry_url=args.registry,
        gateway_id=args.gateway_id,
        host=args.host,
        port=args.port,
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        admin_host=args.admin_host,
        admin_port=args.admin_port,
        commit_interval=args.commit_interval_ms / 1000,
        heartbeat=args.heartbeat,
        auth_timeout=args.auth_timeout,
        drain_seconds=args.drain_seconds,
        admission=AdmissionLimits(
            handshake_timeout=args.handshake_timeout,
            max_pending=max_pending,
            max_pending_per_address=args.max_unauthenticated_per_address,
        ),
        service=ServiceConfig(
            window=args.window,
            max_group_members=args.max_group_members,
            rate=args.rate_limit,
            burst=max(args.rate_limit * 2, 1.0),
            presence_debounce=args.presence_debounce,
        ),
        media=media_config(args),
    )
    # Embedded mode: one server per data directory (roost/store/datadir.py).
    lock: contextlib.AbstractContextManager[Any] = (
        contextlib.nullcontext() if args.store else ServerLock(config.data_dir)
    )
    try:
        with lock:
            stopped_by = serve(config)
    except (OSError, DataDirError, TLSConfigError) as exc:
        print(f"roost serve: {exc}", file=sys.stderr)
        return 1
    # Ctrl-C exits 130 as shells expect; SIGTERM (a service manager's stop) is a normal end.
    return 130 if stopped_by == signal.SIGINT else 0


def _add_user(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("user", help="manage accounts")
    users = p.add_subparsers(dest="user_cmd", required=True)
    add = users.add_parser("add", help="create a user; prints its bearer token as the last line")
    add.add_argument("name")
    add.add_argument("--data-dir", default="roost-data")
    add.add_argument(
        "--create", action="store_true", help="create the data directory's database if it has none yet"
    )
    add.add_argument("--store", default=None, help="cluster mode: postgresql://... instead of --data-dir")
    add.set_defaults(func=_user_add)
    from roost.cli import users as administration

    administration.register(users)


def _add_dev_cluster(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "dev-cluster", help="throwaway PostgreSQL + Redis + N gateways on this machine (Ctrl-C stops)"
    )
    p.add_argument("--gateways", type=int, default=3)
    p.add_argument("--port", type=int, default=8765, help="first gateway's port (then +1, +2, ...)")
    p.add_argument(
        "--no-restart", action="store_true", help="leave a dead gateway down (to watch clients fail over)"
    )
    p.add_argument(
        "--media",
        default=None,
        help="blobs: 'seaweed' (start a throwaway SeaweedFS S3 server), or a roost serve --media "
        "value (S3 credentials from ROOST_S3_ACCESS_KEY / ROOST_S3_SECRET_KEY); default: one "
        "directory shared by the gateways",
    )
    p.set_defaults(func=lambda a: _dev_cluster(a))


def _dev_cluster(args: argparse.Namespace) -> int:
    from roost.devcluster.run import run_dev_cluster

    return run_dev_cluster(args.gateways, args.port, restart=not args.no_restart, media=args.media)


def _user_add(args: argparse.Namespace) -> int:
    from roost.core.ids import is_valid_user_name
    from roost.core.tokens import hash_token
    from roost.protocol.errors import ProtocolError
    from roost.service.chat import now_ms
    from roost.store.datadir import DataDirError, require_database
    from roost.store.sqlite import SqliteStore, database_path

    if not is_valid_user_name(args.name):
        print("roost user add: a name is 1-32 of a-z 0-9 _ . -", file=sys.stderr)
        return 2
    if not args.store:
        try:
            require_database(args.data_dir, create=args.create)
        except DataDirError as exc:
            print(f"roost user add: {exc}", file=sys.stderr)
            return 1
    # A fixed prefix: a token never starts with '-', which a command line
    # would take for an option.
    token = "rt_" + secrets.token_urlsafe(32)

    async def add() -> None:
        if args.store:
            from roost.store.postgres import PostgresStore

            store: Any = PostgresStore(args.store)
        else:
            store = SqliteStore(database_path(args.data_dir))
        await store.open()
        try:
            await store.add_user(args.name, hash_token(token), now_ms())
        finally:
            await store.close()

    try:
        asyncio.run(add())
    except ProtocolError as exc:
        print(f"roost user add: {exc.message}", file=sys.stderr)
        return 1
    print(f"created user {args.name}; its token (shown once):")
    print(token)
    return 0


def _add_verify(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from roost.verify.run import NEMESES

    p = sub.add_parser("verify", help="run a workload under faults and check the history (no loss, order)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--embedded", action="store_true", help="start its own roost serve (SQLite)")
    mode.add_argument("--cluster", action="store_true", help="start its own PostgreSQL, Redis and 3 gateways")
    mode.add_argument(
        "--url", action="append", help="an existing deployment's gateway (repeatable); client faults only"
    )
    p.add_argument(
        "--store", default=None, help="with --url: postgresql://... or data dir, to add test users"
    )
    p.add_argument("--duration", type=float, default=60.0, help="seconds of workload")
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--per-process", type=int, default=5, help="clients per client process")
    p.add_argument("--rate", type=float, default=100.0, help="messages per second, all clients together")
    p.add_argument("--seed", type=int, default=1, help="faults and workload are drawn from it")
    p.add_argument("--no", action="append", choices=NEMESES, help="switch a nemesis off (repeatable)")
    p.add_argument("--json", default=None, help="write the result as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the run's directory (logs, client states)")
    p.set_defaults(func=_verify)


def _verify(args: argparse.Namespace) -> int:
    from roost.verify.run import run_cli

    return run_cli(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="roost", description="Roost messaging server")
    parser.add_argument("--version", action="version", version=f"roost {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_user(sub)
    _add_dev_cluster(sub)
    _add_verify(sub)
    from roost.cli import backup

    backup.register(sub)
    from roost.cli import client_commands

    client_commands.register(sub)
    from roost.cli import simulate

    simulate.register(sub)
    from roost.bench import cli as bench

    bench.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Building the parser imports most of roost (and aiohttp): a Ctrl-C that
    # early is as clean as one later.
    command = "roost"
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        command = f"roost {args.command}"
        if args.command == "serve":
            from roost.cli import serve_config

            args = serve_config.settle(parser, argv, args, os.environ)
            if args.print_config:
                sys.stdout.write(serve_config.render(parser, args))
                return 0
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"{command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
