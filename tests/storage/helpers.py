"""Shared values for the storage suite: a fixed clock origin, signing-key records, and the
live secrets as a login reads them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from alembic import command
from sqlalchemy import Engine

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
