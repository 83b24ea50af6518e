"""Schema migrations (Alembic, shipped in the package and configured in code: no alembic.ini)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

from authsvc.storage.engine import READ_ONLY

if TYPE_CHECKING:
    from authsvc.crypto.kek import KekRing

__all__ = ["current_revision", "head_revision", "is_current", "upgrade"]

SCRIPT_LOCATION = "authsvc.storage:migrations"
# Session-level advisory lock held while migrating PostgreSQL, so replicas starting together
# upgrade one after another (the later ones then find the schema at head and do nothing).
_PG_MIGRATION_LOCK = 0x6175_7468_7376_0001
# Alembic's `context` and `op` are module-level proxies: two migrations running on threads of one
# process would trample each other, so this process runs one at a time.
_ALEMBIC_LOCK = threading.Lock()


@contextlib.contextmanager
def _sqlite_file_lock(engine: Engine) -> Iterator[None]:
    """Serialise upgrades of one SQLite file across processes.

    Alembic runs SQLite migrations without transactional DDL, so two processes starting on one
    file could both read revision N and both apply N+1 ("duplicate column name"). An exclusive
    `flock` on a lock file beside the database makes the later one wait and then find the schema
    at head. In-memory databases belong to one process and need no lock.
    """
    database = engine.url.database
    in_memory = not database or database.startswith((":memory:", "file:"))
    if engine.dialect.name != "sqlite" or in_memory:
        yield
        return
    fd = os.open(f"{database}.migrate-lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    return cfg


def upgrade(engine: Engine, kek_ring: KekRing | None = None) -> None:
    """Bring the schema to head; safe to call from several processes at once.

    `kek_ring`: the server's KEKs, for revisions that rewrite wrapped data (0005 adopts the
    secret-hash key); a database with data refuses such a revision without them.
    """
    cfg = _config()
    cfg.attributes["kek_ring"] = kek_ring
    postgres = engine.dialect.name == "postgresql"
    with _ALEMBIC_LOCK, _sqlite_file_lock(engine), engine.connect() as conn:
        if postgres:
            conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
            conn.commit()
        try:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        finally:
            if postgres:
                conn.rollback()
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_MIGRATION_LOCK})
                conn.commit()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None for an empty database."""
    with engine.connect().execution_options(**{READ_ONLY: True}) as conn, conn.begin() as tx:
        try:
            return MigrationContext.configure(conn).get_current_revision()
        finally:
            tx.rollback()


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships 0001
        raise RuntimeError("no migrations found")
    return head


def is_current(engine: Engine) -> bool:
    return current_revision(engine) == head_revision()
