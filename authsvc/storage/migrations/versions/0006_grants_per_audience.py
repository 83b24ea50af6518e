"""Grants per audience: a service's scopes belong to the audience they are granted for.

Until this revision a service had a list of audiences and a list of scopes, and a token for any
of its audiences could carry any of its scopes: `orders` allowed `billing` and `inventory` with
`billing.read` and `inventory.admin` got billing tokens carrying `inventory.admin`. The `grants`
column maps each audience to its own scopes. Existing rows keep exactly what they could do:
every scope for every audience.

Plain ALTER TABLE on both dialects (SQLite >= 3.35 drops columns natively): a batch rebuild of
`services` would drop the table, and with foreign keys on, SQLite's DROP TABLE deletes the
`service_secrets` rows through ON DELETE CASCADE.

The downgrade writes the old two lists back. The old schema cannot say "this scope for that
audience only", so it refuses, before any change, while a service's audiences differ in their
scopes: it would otherwise widen them. Make the grants uniform first (or remove the service).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    conn = op.get_bind()
    op.add_column("services", sa.Column("grants", sa.Text(), nullable=False, server_default="{}"))
    rows = conn.execute(sa.text("SELECT service_id, audiences, scopes FROM services")).all()
    for service_id, audiences, scopes in rows:
        every = list(dict.fromkeys(json.loads(scopes)))
        grants = {audience: every for audience in json.loads(audiences)}
        conn.execute(
            sa.text("UPDATE services SET grants = :grants WHERE service_id = :service_id"),
            {"grants": json.dumps(grants, separators=(",", ":")), "service_id": service_id},
        )
    op.execute("ALTER TABLE services DROP COLUMN audiences")
    op.execute("ALTER TABLE services DROP COLUMN scopes")


def downgrade() -> None:
    conn = op.get_bind()
    back: list[tuple[str, str, str]] = []
    narrowed: list[str] = []
    for service_id, text in conn.execute(sa.text("SELECT service_id, grants FROM services")):
        grants: dict[str, list[str]] = json.loads(text)
        every = list(dict.fromkeys(s for scopes in grants.values() for s in scopes))
        if any(set(scopes) != set(every) for scopes in grants.values()):
            narrowed.append(service_id)
        back.append((service_id, json.dumps(list(grants)), json.dumps(every)))
    if narrowed:
        raise RuntimeError(
            "cannot downgrade below 0006: these services have scopes granted for some of their "
            "audiences only, which the older schema would grant for all of them: "
            + ", ".join(sorted(narrowed))
        )
    for column in ("audiences", "scopes"):
        op.add_column("services", sa.Column(column, sa.Text(), nullable=False, server_default="[]"))
    for service_id, audiences, scopes in back:
        conn.execute(
            sa.text(
                "UPDATE services SET audiences = :audiences, scopes = :scopes "
                "WHERE service_id = :service_id"
            ),
            {"audiences": audiences, "scopes": scopes, "service_id": service_id},
        )
    op.execute("ALTER TABLE services DROP COLUMN grants")
