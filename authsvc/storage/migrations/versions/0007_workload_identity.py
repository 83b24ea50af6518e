"""Workload identity: credentials beyond shared secrets, trusted issuers, used assertions.

A service may now log in with a signed assertion (a registered public key), a client
certificate (a registered SAN) or a federated token (a subject of a trusted issuer), and need
not have a secret at all: a secretless service simply has no `service_secrets` row, so nothing
about the existing tables changes but the `changes.kind` CHECK, which gains 'trust'.

That CHECK is altered in place on PostgreSQL. SQLite cannot alter a constraint, so `changes` is
rebuilt (batch mode); nothing references it, so the rebuild cascades nowhere (unlike a rebuild
of `services`, see 0006), and the AUTOINCREMENT counter is carried over so that no cursor a
follower has seen is handed out again.

The downgrade drops the three tables (every registered workload credential and trust with
them: a service left without a secret can no longer log in) and deletes the 'trust' change
rows, which the older CHECK cannot hold and the older code has no use for.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out rather than imported from models.py: a migration must not change when the models do.
_TS = sa.DateTime(timezone=True)
_CURSOR = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_ID = 255
_REF = 2048  # a SAN is a ref, and a SPIFFE ID may have 2048 bytes


def _changes_kind_check(kinds: str) -> None:
    """Replace the CHECK on changes.kind; a rebuild on SQLite that keeps the cursor counter."""
    conn = op.get_bind()
    sqlite = conn.dialect.name == "sqlite"
    seq = None
    if sqlite:
        seq = conn.execute(
            sa.text("SELECT seq FROM sqlite_sequence WHERE name = 'changes'")
        ).scalar()
    with op.batch_alter_table(
        "changes",
        recreate="always" if sqlite else "never",
        table_kwargs={"sqlite_autoincrement": True},
    ) as batch:
        batch.drop_constraint(op.f("ck_changes_kind"), type_="check")
        batch.create_check_constraint(op.f("ck_changes_kind"), sa.text(f"kind IN ({kinds})"))
    if seq is not None:
        conn.execute(
            sa.text("UPDATE sqlite_sequence SET seq = max(seq, :seq) WHERE name = 'changes'"),
            {"seq": seq},
        )
        conn.execute(
            sa.text(
                "INSERT INTO sqlite_sequence (name, seq) SELECT 'changes', :seq "
                "WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'changes')"
            ),
            {"seq": seq},
        )


def upgrade() -> None:
    op.create_table(
        "service_credentials",
        sa.Column("id", _CURSOR, autoincrement=True, nullable=False),
        sa.Column("service_id", sa.String(_ID), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("ref", sa.String(_REF), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.CheckConstraint(
            "kind IN ('public_key', 'tls_san', 'federated')",
            name=op.f("ck_service_credentials_kind"),
        ),
        sa.ForeignKeyConstraint(
            ["service_id"],
            ["services.service_id"],
            name=op.f("fk_service_credentials_service_id_services"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_service_credentials")),
        sqlite_autoincrement=True,
    )
    op.create_index(
        op.f("ix_service_credentials_service_id"), "service_credentials", ["service_id"]
    )
    # A key id or SAN once per service; a federated subject bound to one service fleet-wide.
    op.create_index(
        "uq_service_credentials_ref",
        "service_credentials",
        ["service_id", "kind", "ref"],
        unique=True,
        sqlite_where=sa.text("kind <> 'federated'"),
        postgresql_where=sa.text("kind <> 'federated'"),
    )
    op.create_index(
        "uq_service_credentials_federated",
        "service_credentials",
        ["kind", "ref", "value"],
        unique=True,
        sqlite_where=sa.text("kind = 'federated'"),
        postgresql_where=sa.text("kind = 'federated'"),
    )
    op.create_table(
        "trusted_issuers",
        sa.Column("name", sa.String(_ID), nullable=False),
        sa.Column("issuer", sa.Text(), nullable=False),
        sa.Column("audience", sa.Text(), nullable=False),
        sa.Column("jwks_json", sa.Text(), nullable=True),
        sa.Column("jwks_url", sa.Text(), nullable=True),
        sa.Column("max_lifetime_seconds", sa.Integer(), nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.Column("updated_at", _TS, nullable=False),
        sa.CheckConstraint(
            "(jwks_json IS NULL) <> (jwks_url IS NULL)",
            name=op.f("ck_trusted_issuers_one_key_source"),
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_trusted_issuers")),
        sa.UniqueConstraint("issuer", name=op.f("uq_trusted_issuers_issuer")),
    )
    op.create_table(
        "used_assertions",
        sa.Column("service_id", sa.String(_ID), nullable=False),
        sa.Column("jti", sa.String(256), nullable=False),
        sa.Column("expires_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("service_id", "jti", name=op.f("pk_used_assertions")),
    )
    op.create_index(op.f("ix_used_assertions_expires_at"), "used_assertions", ["expires_at"])
    _changes_kind_check("'key', 'service', 'trust'")


def downgrade() -> None:
    op.execute("DELETE FROM changes WHERE kind = 'trust'")
    _changes_kind_check("'key', 'service'")
    op.drop_index(op.f("ix_used_assertions_expires_at"), table_name="used_assertions")
    op.drop_table("used_assertions")
    op.drop_table("trusted_issuers")
    op.drop_index("uq_service_credentials_federated", table_name="service_credentials")
    op.drop_index("uq_service_credentials_ref", table_name="service_credentials")
    op.drop_index(op.f("ix_service_credentials_service_id"), table_name="service_credentials")
    op.drop_table("service_credentials")
