"""Engine construction: SQLite (WAL, one writer, BEGIN IMMEDIATE) or PostgreSQL over psycopg 3."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import ConnectionPoolEntry

from authsvc.errors import ConfigError

__all__ = [
    "READ_ONLY",
    "describe_db_error",
    "is_sqlite",
    "make_engine",
    "prepare_sqlite_file",
    "write_lock",
]

# Execution option: the transaction only reads (plain BEGIN on SQLite, READ ONLY on PostgreSQL).
# Without it a SQLite transaction opens with BEGIN IMMEDIATE, so Alembic's DDL works unchanged.
READ_ONLY = "authsvc_read_only"
# Execution option holding the engine's process-local writer lock (SQLite only).
_WRITE_LOCK = "authsvc_write_lock"
_BUSY_TIMEOUT_MS = 5000
_PG_CONNECT_TIMEOUT_S = 5


def make_engine(url: str) -> Engine:
    """Build an engine for a `sqlite:///path` or `postgresql[+psycopg]://` URL.

    Raises:
        ValueError: for any other database (the message names the backend, not the URL).
    """
    parsed = make_url(url)
    if parsed.drivername == "postgres":
        # What Heroku, libpq docs and most dashboards print; SQLAlchemy dropped the alias.
        parsed = parsed.set(drivername="postgresql")
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return _sqlite_engine(parsed)
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        elif parsed.drivername != "postgresql+psycopg":
            raise ValueError("only the psycopg (v3) driver is supported for PostgreSQL")
        return _postgres_engine(parsed)
    raise ValueError(f"unsupported database backend {backend!r}: use sqlite or postgresql")


def prepare_sqlite_file(url: str) -> None:
    """Create a SQLite database file owner-only (it holds wrapped keys and secret hashes).

    A no-op for other databases. Called where a process opens its configured database
    (`build_core`), so an engine itself stays lazy.

    SQLite gives its -wal and -shm files the main file's mode, so 0600 here covers all three.
    A missing folder is created only inside the working directory: a typo such as
    `sqlite:////nonexistent/dir/a.db` must not quietly make folders elsewhere.
    """
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return
    if database.startswith("file:"):
        return
    path = Path(database)
    folder = path.parent.resolve()
    if not folder.is_dir():
        if not folder.is_relative_to(Path.cwd().resolve()):
            raise ConfigError(
                f"the folder of the SQLite database does not exist: {folder} (create it first)"
            )
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


def describe_db_error(exc: BaseException) -> str:
    """One line from a driver error: psycopg's text is many lines and names no password."""
    orig = getattr(exc, "orig", None) or exc
    text = " ".join(str(orig).split())
    return text[:300] or type(orig).__name__


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def write_lock(engine: Engine) -> AbstractContextManager[object]:
    """The lock this process's write transactions hold on SQLite (one writer); no-op otherwise."""
    lock = engine.get_execution_options().get(_WRITE_LOCK)
    return cast(AbstractContextManager[object], lock) if lock is not None else nullcontext()


def _postgres_engine(url: URL) -> Engine:
    engine = create_engine(
        url,
        pool_pre_ping=True,
        pool_size=5,
        max_overflow=10,
        pool_timeout=10,
        # Never put parameter values (hashes, wrapped keys) into exception text.
        hide_parameters=True,
        connect_args={"connect_timeout": _PG_CONNECT_TIMEOUT_S},
    )

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        if conn.get_execution_options().get(READ_ONLY):
            # A stray write in a read method fails instead of committing.
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")

    return engine


def _sqlite_engine(url: URL) -> Engine:
    engine = create_engine(
        url,
        hide_parameters=True,
        connect_args={"timeout": _BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
        execution_options={_WRITE_LOCK: threading.Lock()},
    )

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
        # Take BEGIN away from the sqlite3 module (SQLAlchemy's pysqlite recipe); _begin emits it.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            _enable_wal(cur)
            cur.execute("PRAGMA foreign_keys = ON")
            cur.execute("PRAGMA synchronous = NORMAL")
        finally:
            cur.close()
        record.info["query_only"] = False

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        read_only = bool(conn.get_execution_options().get(READ_ONLY))
        if conn.info.get("query_only") != read_only:
            # query_only makes a stray write in a read method fail loudly.
            conn.exec_driver_sql(f"PRAGMA query_only = {int(read_only)}")
            conn.info["query_only"] = read_only
        # Writers take the database write lock up front: two processes rotating at once queue
        # here (busy_timeout) instead of both reading the old state and failing to upgrade later.
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


def _enable_wal(cur: Any) -> None:
    """Switch to WAL, waiting out another process doing the same.

    Processes opening a new database at once (replicas or CLI commands starting together)
    race to convert it to WAL; the losers get "database is locked" at once, without SQLite's
    busy handler being consulted (seen in tests/storage/test_concurrency.py in about 1 run in
    5 with three processes). Retried here for as long as the busy timeout would have waited.
    """
    deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cur.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)
