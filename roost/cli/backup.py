"""``roost backup`` and ``roost restore``: the embedded store to one file and back.

The work is in ``roost.store.backup``; in cluster mode the database is
PostgreSQL's to back up (docs/deploy.md).
"""

from __future__ import annotations

import argparse
import sys

from roost.cli.errors import EXIT_FAILED, EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "backup", help="copy the embedded database to one file, consistent, while the server keeps serving"
    )
    p.add_argument("--data-dir", default="roost-data", help="the server's data directory")
    p.add_argument("--to", required=True, metavar="FILE", help="the backup file to write")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.set_defaults(func=_backup)

    p = sub.add_parser(
        "restore", help="make a backup file the data directory's database (no server may be running on it)"
    )
    p.add_argument("--from", dest="source", required=True, metavar="FILE", help="a file from roost backup")
    p.add_argument("--data-dir", default="roost-data", help="the data directory to restore into")
    p.add_argument("--force", action="store_true", help="replace the data directory's existing database")
    p.set_defaults(func=_restore)


def _backup(args: argparse.Namespace) -> int:
    from roost.store.backup import BackupError, backup

    try:
        result = backup(args.data_dir, args.to, force=args.force)
    except BackupError as exc:
        print(f"roost backup: {exc}", file=sys.stderr)
        return EXIT_FAILED
    how = " (finished in one step after the server's commits restarted it)" if result.one_step else ""
    print(f"backed up {args.data_dir} to {args.to}: {result.pages} pages{how}")
    return EXIT_OK


def _restore(args: argparse.Namespace) -> int:
    from roost.store.backup import BackupError, restore

    try:
        version = restore(args.source, args.data_dir, force=args.force)
    except BackupError as exc:
        print(f"roost restore: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"restored {args.source} (schema {version}) into {args.data_dir}")
    return EXIT_OK
