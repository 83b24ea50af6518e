"""Initial schema: services, secrets, signing keys, revocations, changes, audit, throttling.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out rather than imported from models.py: a migration must not change when the models do.
_TS = sa.DateTime(timezone=True)
_CURSOR = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_ID = 255


def upgrade() -> None:
    op.create_table(
        "services",
        sa.Column("service_id", sa.String(_ID), nullable=False),
        sa.Column("audiences", sa.Text(), nullable=False),
        sa.Column("scopes", sa.Text(), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("service_id", name=op.f("pk_services")),
    )
    op.create_table(
        "service_secrets",
        sa.Column("service_id", sa.String(_ID), nullable=False),
        sa.Column("slot", sa.String(16), nullable=False),
        sa.Column("secret_hash", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("expires_at", _TS, nullable=True),
        sa.CheckConstraint("slot IN ('current', 'previous')", name=op.f("ck_service_secrets_slot")),
        sa.ForeignKeyConstraint(
            ["service_id"],
            ["services.service_id"],
            name=op.f("fk_service_secrets_service_id_services"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("service_id", "slot", name=op.f("pk_service_secrets")),
    )
    op.create_table(
        "signing_keys",
        sa.Column("kid", sa.String(_ID), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("activated_at", _TS, nullable=True),
        sa.Column("retired_at", _TS, nullable=True),
        sa.Column("publish_until", _TS, nullable=True),
        sa.Column("public_jwk", sa.Text(), nullable=False),
        sa.Column("private_key_enc", sa.LargeBinary(), nullable=True),
        sa.CheckConstraint(
            "state IN ('next', 'active', 'retired', 'revoked')",
            name=op.f("ck_signing_keys_state"),
        ),
        sa.PrimaryKeyConstraint("kid", name=op.f("pk_signing_keys")),
    )
    # At most one active key, whoever races.
    op.create_index(
        "uq_signing_keys_one_active",
        "signing_keys",
        ["state"],
        unique=True,
        sqlite_where=sa.text("state = 'active'"),
        postgresql_where=sa.text("state = 'active'"),
    )
    op.create_table(
        "revocations",
        sa.Column("cursor", _CURSOR, autoincrement=True, nullable=False),
        sa.Column("jti", sa.String(_ID), nullable=True),
        sa.Column("service_id", sa.String(_ID), nullable=True),
        sa.Column("revoked_before", _TS, nullable=True),
        sa.Column("expires_at", _TS, nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.CheckConstraint(
            "(jti IS NULL) <> (service_id IS NULL)", name=op.f("ck_revocations_one_target")
        ),
        sa.PrimaryKeyConstraint("cursor", name=op.f("pk_revocations")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_revocations_expires_at"), "revocations", ["expires_at"])
    op.create_index(
        "uq_revocations_jti",
        "revocations",
        ["jti"],
        unique=True,
        sqlite_where=sa.text("jti IS NOT NULL"),
        postgresql_where=sa.text("jti IS NOT NULL"),
    )
    op.create_table(
        "changes",
        sa.Column("cursor", _CURSOR, autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("ref", sa.String(_ID), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.CheckConstraint("kind IN ('key', 'service')", name=op.f("ck_changes_kind")),
        sa.PrimaryKeyConstraint("cursor", name=op.f("pk_changes")),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "audit_events",
        sa.Column("id", _CURSOR, autoincrement=True, nullable=False),
        sa.Column("at", _TS, nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("peer", sa.Text(), nullable=False),
        sa.Column("request_id", sa.Text(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_audit_events_at"), "audit_events", ["at"])
    op.create_table(
        "auth_failures",
        sa.Column("key", sa.String(512), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("window_start", _TS, nullable=False),
        sa.Column("last_failure_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_auth_failures")),
    )


def downgrade() -> None:
    op.drop_table("auth_failures")
    op.drop_index(op.f("ix_audit_events_at"), table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_table("changes")
    op.drop_index("uq_revocations_jti", table_name="revocations")
    op.drop_index(op.f("ix_revocations_expires_at"), table_name="revocations")
    op.drop_table("revocations")
    op.drop_index("uq_signing_keys_one_active", table_name="signing_keys")
    op.drop_table("signing_keys")
    op.drop_table("service_secrets")
    op.drop_table("services")
