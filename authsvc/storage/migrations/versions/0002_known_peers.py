"""Known peers: where each service id last logged in, so its own address is never locked out.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "known_peers",
        sa.Column("service_id", sa.String(255), nullable=False),
        sa.Column("peer", sa.String(512), nullable=False),
        sa.Column("last_success_at", _TS, nullable=False),
        sa.PrimaryKeyConstraint("service_id", "peer", name=op.f("pk_known_peers")),
    )
    op.create_index(op.f("ix_known_peers_last_success_at"), "known_peers", ["last_success_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_known_peers_last_success_at"), table_name="known_peers")
    op.drop_table("known_peers")
