"""KEK rotation: a kek id beside every wrapped key, and the secret-hash key stored wrapped.

Until this revision the secret-hash key was derived from the KEK, so a new KEK made every stored
secret hash useless. It is now key material of its own, wrapped under the KEK like the signing
keys; a deployment that has data keeps today's derived value, so every existing secret still
logs in. Doing that needs the KEK that wraps the stored keys: `migrate.upgrade` passes the
server's KEKs in (`kek_ring`), and the revision refuses to run on a database with data without.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import context, op

from authsvc.crypto.kek import KekRing, KeyEncryptionKey
from authsvc.errors import ConfigError, DecryptError

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)
# Frozen here: what authsvc.server.app derived the secret-hash key with before this revision,
# and the row it now lives in (authsvc.storage.records.SECRET_HASH_KEY).
_LEGACY_HASH_PURPOSE = b"authsvc/service-secret-hash/v1"
_SECRET_HASH_KEY = "secret-hash"  # noqa: S105 (a row name)
_NEEDS_KEK = (
    "migration 0005 needs the key-encryption key that wraps the stored signing keys: run "
    "`authsvc db upgrade` (or `authsvc serve`) with AUTHSVC_KEK set to it"
)


def _wrapping_kek(ring: KekRing | None, blobs: list[tuple[str, bytes]]) -> KeyEncryptionKey:
    """The held KEK that unwraps every stored private key (the first one, with none stored)."""
    if ring is None:
        raise ConfigError(_NEEDS_KEK)
    for kek in ring.keks:
        try:
            for kid, blob in blobs:
                kek.unwrap(blob, kid=kid)
        except DecryptError:
            continue
        return kek
    raise ConfigError(
        "AUTHSVC_KEK cannot decrypt the stored signing keys (wrong key-encryption key?)"
    )


def _stored_key_is_derived(conn: sa.Connection, ring: KekRing | None) -> bool:
    """Whether the stored secret-hash key equals the older code's derivation from a KEK in
    `ring` (the KEK it would run with); False without a ring to tell."""
    row = conn.execute(
        sa.text("SELECT kek_id, wrapped FROM wrapped_keys WHERE name = :name"),
        {"name": _SECRET_HASH_KEY},
    ).first()
    if row is None or ring is None:
        return row is None  # nothing stored: the older derivation is all there ever was
    for kek in ring.keks:
        if kek.kek_id != row[0]:
            continue
        try:
            stored = kek.unwrap_named(bytes(row[1]), name=_SECRET_HASH_KEY)
        except DecryptError:
            return False
        return stored == kek.derive(_LEGACY_HASH_PURPOSE)
    return False


def upgrade() -> None:
    conn = op.get_bind()
    stored = sa.text(
        "SELECT kid, private_key_enc FROM signing_keys WHERE private_key_enc IS NOT NULL"
    )
    blobs = [(str(kid), bytes(blob)) for kid, blob in conn.execute(stored)]
    has_secrets = conn.execute(sa.text("SELECT 1 FROM service_secrets LIMIT 1")).first()
    kek = None
    if blobs or has_secrets is not None:
        # Before any DDL: a wrong or missing KEK changes nothing.
        kek = _wrapping_kek(context.config.attributes.get("kek_ring"), blobs)

    with op.batch_alter_table("signing_keys") as batch:
        batch.add_column(sa.Column("kek_id", sa.String(32), nullable=True))
    wrapped_keys = op.create_table(
        "wrapped_keys",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("kek_id", sa.String(32), nullable=False),
        sa.Column("wrapped", sa.LargeBinary(), nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_wrapped_keys")),
    )
    if kek is None:
        return  # an empty database: the server stores a random secret-hash key at start
    conn.execute(
        sa.text("UPDATE signing_keys SET kek_id = :kek_id WHERE private_key_enc IS NOT NULL"),
        {"kek_id": kek.kek_id},
    )
    op.bulk_insert(
        wrapped_keys,
        [
            {
                "name": _SECRET_HASH_KEY,
                "kek_id": kek.kek_id,
                "wrapped": kek.wrap_named(
                    kek.derive(_LEGACY_HASH_PURPOSE), name=_SECRET_HASH_KEY
                ),
                "updated_at": datetime.now(UTC),
            }
        ],
    )


def downgrade() -> None:
    """Refused while service secrets exist, unless the stored secret-hash key is the one the
    older code derives from the KEK (given as `kek_ring`): a database created at 0005 or later
    holds a random one, and `kek rotate` keeps the old derivation under a new KEK, so dropping
    it would make every stored secret hash useless at once (no service could log in)."""
    conn = op.get_bind()
    has_secrets = conn.execute(sa.text("SELECT 1 FROM service_secrets LIMIT 1")).first()
    if has_secrets is not None and not _stored_key_is_derived(
        conn, context.config.attributes.get("kek_ring")
    ):
        raise RuntimeError(
            "cannot downgrade below 0005: the stored service secrets are hashed under a "
            "secret-hash key the older code cannot derive from AUTHSVC_KEK, so none of them "
            "would log in again (restore a backup taken before 0005 instead)"
        )
    op.drop_table("wrapped_keys")
    with op.batch_alter_table("signing_keys") as batch:
        batch.drop_column("kek_id")
