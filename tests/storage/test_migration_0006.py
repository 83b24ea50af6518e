"""Migration 0006 on a database written before it: grants per audience, nothing widened or lost.

Before 0006 every scope of a service was good for every one of its audiences; the revision keeps
exactly that for existing rows (and their secrets: `services` is altered, never rebuilt, so
SQLite's ON DELETE CASCADE cannot take `service_secrets` with it). The downgrade refuses while
a grant is narrower than the old schema can say.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy import Engine

from authsvc.storage import migrate
from authsvc.storage.engine import make_engine
from authsvc.storage.records import AudienceGrant
from authsvc.storage.repository import Repository
from tests.storage.helpers import live_secrets

_TS = sa.DateTime(timezone=True)
_legacy = sa.MetaData()
_services = sa.Table(
    "services", _legacy,
    sa.Column("service_id", sa.String), sa.Column("audiences", sa.Text),
    sa.Column("scopes", sa.Text), sa.Column("disabled", sa.Boolean),
    sa.Column("created_at", _TS), sa.Column("updated_at", _TS),
)  # fmt: skip
_secrets = sa.Table(
    "service_secrets", _legacy,
    sa.Column("service_id", sa.String), sa.Column("slot", sa.String),
    sa.Column("secret_hash", sa.LargeBinary), sa.Column("created_at", _TS),
    sa.Column("expires_at", _TS),
)  # fmt: skip


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    try:
        yield engine
    finally:
        engine.dispose()


def _to(engine: Engine, revision: str, *, down: bool = False) -> None:
    with engine.connect() as conn:
        cfg = migrate._config()
        cfg.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(cfg, revision)
        conn.commit()


def _legacy_rows(engine: Engine) -> None:
    """Two services as the code before 0006 wrote them, one of them with a secret."""
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(
            _services.insert(),
            [
                {
                    "service_id": "orders", "audiences": '["billing", "inventory"]',
                    "scopes": '["billing.read", "inventory.admin"]', "disabled": False,
                    "created_at": now, "updated_at": now,
                },
                {
                    "service_id": "ops", "audiences": '["authsvc"]',
                    "scopes": '["authsvc.admin"]', "disabled": True,
                    "created_at": now, "updated_at": now,
                },
            ],
        )  # fmt: skip
        conn.execute(
            _secrets.insert().values(
                service_id="orders", slot="current", secret_hash=b"h" * 32,
                created_at=now, expires_at=None,
            )
        )  # fmt: skip


class TestMigration0006:
    def test_existing_services_keep_every_scope_for_every_audience(self, engine: Engine) -> None:
        _to(engine, "0005")
        _legacy_rows(engine)
        _to(engine, "0006")
        assert migrate.current_revision(engine) == "0006"
        repo = Repository(engine)
        orders = repo.fetch_service("orders")
        assert orders is not None
        both = ("billing.read", "inventory.admin")
        assert orders.grants == (AudienceGrant("billing", both), AudienceGrant("inventory", both))
        ops = repo.fetch_service("ops")
        assert ops is not None and ops.disabled
        assert ops.grants == (AudienceGrant("authsvc", ("authsvc.admin",)),)
        # Altered, not rebuilt: the secret survived (a rebuild would cascade-delete it).
        assert [slot for slot, _ in live_secrets(repo, "orders", datetime.now(UTC))] == ["current"]

    def test_downgrade_restores_the_two_lists_when_grants_are_uniform(self, engine: Engine) -> None:
        _to(engine, "0005")
        _legacy_rows(engine)
        migrate.upgrade(engine)
        _to(engine, "0005", down=True)
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT service_id, audiences, scopes FROM services ORDER BY service_id")
            ).all()
            secrets = conn.execute(sa.text("SELECT count(*) FROM service_secrets")).scalar()
        assert [tuple(r) for r in rows] == [
            ("ops", '["authsvc"]', '["authsvc.admin"]'),
            ("orders", '["billing", "inventory"]', '["billing.read", "inventory.admin"]'),
        ]
        assert secrets == 1

    def test_downgrade_refuses_to_widen_a_per_audience_grant(self, engine: Engine) -> None:
        _to(engine, "0006")
        repo = Repository(engine)
        repo.create_service(
            "orders",
            [AudienceGrant("billing", ("billing.read",)), AudienceGrant("inventory", ())],
            b"h" * 32,
            datetime.now(UTC),
        )
        with pytest.raises(RuntimeError, match="orders"):
            _to(engine, "0005", down=True)
        assert migrate.current_revision(engine) == "0006"
        orders = repo.fetch_service("orders")
        assert orders is not None and orders.scopes_for("inventory") == ()
