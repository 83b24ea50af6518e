"""`authsvc db backup`: SQLite's online backup API (PostgreSQL uses pg_dump, see README)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

from sqlalchemy.engine import make_url

from authsvc.errors import ConfigError

__all__ = ["backup_sqlite"]

# Every page in one step, inside one read transaction: in WAL mode a reader blocks no writer, so
# the server goes on writing, and the copy is the snapshot of one moment. (Copying in several
# steps would restart whenever another process writes between them: never ending beside a busy
# server.)
_ALL_PAGES = -1


def backup_sqlite(database_url: str, dest: Path) -> None:
    """Copy the SQLite database in `database_url` to `dest`, consistent as of one moment.

    The copy is written beside `dest` and renamed into place once complete, with mode 0600
    (it holds the wrapped keys and secret hashes), so a crash never leaves a partial backup.

    Raises:
        ConfigError: not a SQLite database, it does not exist, or `dest` exists already.
    """
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        raise ConfigError(
            "`authsvc db backup` is for SQLite; back PostgreSQL up with pg_dump (README)"
        )
    source = url.database
    if not source or source == ":memory:" or not Path(source).is_file():
        raise ConfigError("AUTHSVC_DATABASE_URL names no SQLite database file to back up")
    if dest.exists():
        raise ConfigError("the backup file exists already; give a new path")
    partial = dest.with_name(f".{dest.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.close(fd)
    try:
        src = sqlite3.connect(source, timeout=5)
        try:
            dst = sqlite3.connect(partial)
            try:
                src.backup(dst, pages=_ALL_PAGES)
                # A self-contained file: no -wal beside it is needed to restore.
                dst.execute("PRAGMA journal_mode = DELETE")
            finally:
                dst.close()
        finally:
            src.close()
        os.replace(partial, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise
