"""Revocation kind: what a revocation revokes, so local and remote validators give one reason.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("revocations") as batch:
        batch.add_column(
            sa.Column("kind", sa.String(32), nullable=False, server_default="token")
        )
    # Rows written before this revision: a service row is its tokens, unless disable_service
    # wrote it (the only writer of that reason).
    op.execute(
        "UPDATE revocations SET kind = CASE "
        "WHEN service_id IS NULL THEN 'token' "
        "WHEN reason = 'service disabled' THEN 'service_disabled' "
        "ELSE 'service_tokens' END"
    )


def downgrade() -> None:
    with op.batch_alter_table("revocations") as batch:
        batch.drop_column("kind")
