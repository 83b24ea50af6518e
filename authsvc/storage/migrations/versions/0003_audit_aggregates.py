"""Aggregated audit rows: unauthenticated attempts counted per throttle key and window.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "audit_events",
        sa.Column("count", sa.Integer(), server_default=sa.text("1"), nullable=False),
    )
    op.add_column("audit_events", sa.Column("first_at", sa.DateTime(timezone=True)))
    op.add_column("audit_events", sa.Column("aggregate_key", sa.Text()))
    op.create_index("uq_audit_events_aggregate_key", "audit_events", ["aggregate_key"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_audit_events_aggregate_key", table_name="audit_events")
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_column("aggregate_key")
        batch.drop_column("first_at")
        batch.drop_column("count")
