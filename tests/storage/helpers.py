"""Shared values for the storage suite: a fixed clock origin, signing-key records, the live
secrets as a login reads them, and an INSERT that fails as a database hiccup does."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from alembic import command
from sqlalchemy import Engine, event

from authsvc.storage import migrate
from authsvc.storage.records import SigningKeyRecord
from authsvc.storage.repository import Repository

T0 = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    """T0 plus `seconds`."""
    return T0 + timedelta(seconds=seconds)


def migrate_to(engine: Engine, revision: str, *, down: bool = False) -> None:
    """Upgrade (or downgrade) the schema to exactly `revision`, as one migration test needs
    the schema as it was before the migration it tests."""
    with engine.connect() as conn:
        cfg = migrate._config()
        cfg.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(cfg, revision)
        conn.commit()


def key_record(kid: str, created_at: datetime = T0) -> SigningKeyRecord:
    """A key as the manager hands it to storage (state is set by create_signing_key)."""
    return SigningKeyRecord(
        kid=kid,
        state="next",
        created_at=created_at,
        activated_at=None,
        retired_at=None,
        publish_until=None,
        public_jwk=f'{{"kty":"RSA","kid":"{kid}","n":"AQAB","e":"AQAB"}}',
        private_key_enc=f"wrapped-private-{kid}".encode(),
    )


def live_secrets(repo: Repository, service_id: str, now: datetime) -> list[tuple[str, bytes]]:
    """(slot, hash) of the secrets a login at `now` is checked against, current first."""
    with repo.login_batch(now, 60) as batch:
        return list(batch.secrets(service_id))


@contextmanager
def failing_insert(engine: Engine, table: str, marker: str = "") -> Iterator[list[str]]:
    """The next INSERT into `table` (whose parameters carry `marker`, if given) fails with the
    driver's OperationalError, as SQLite busy past its timeout or a dropped PostgreSQL
    connection does; once. Yields the statements it failed (empty: it never fired)."""
    fired: list[str] = []
    error = engine.dialect.loaded_dbapi.OperationalError
    prefix = f"INSERT INTO {table} "

    def before(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        if fired or not statement.lstrip().startswith(prefix):
            return
        if marker and marker not in repr(parameters):
            return
        fired.append(statement)
        raise error("database is locked")

    event.listen(engine, "before_cursor_execute", before)
    try:
        yield fired
    finally:
        event.remove(engine, "before_cursor_execute", before)
