"""Migration 0007 on a database written before it: workload identity added, nothing lost.

The upgrade only adds tables, and changes one CHECK on `changes`, which SQLite can only do by
rebuilding that table: its rows and its cursor counter must survive (a follower must never be
handed a cursor it has seen). Services and their secrets are untouched. The downgrade drops what
0007 added and the 'trust' change rows the older CHECK cannot hold, and keeps the rest.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc

from authsvc.storage import migrate
from authsvc.storage.engine import make_engine
from authsvc.storage.models import Base
from authsvc.storage.records import AudienceGrant, CredentialRecord, TrustRecord
from authsvc.storage.repository import Repository
from tests.storage.helpers import T0, at, live_secrets

_NEW_TABLES = {"service_credentials", "trusted_issuers", "used_assertions"}


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


def _tables(engine: Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def _changes(engine: Engine) -> list[tuple[int, str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT cursor, kind, ref FROM changes ORDER BY cursor"))
        return [tuple(r) for r in rows]


def _rows_at_0006(engine: Engine) -> None:
    """Two services (one disabled, one with a secret in its grace period) and their changes, as
    the 0006 code wrote them; the newest change row is then deleted, so the table's highest
    cursor is below the counter."""
    repo = Repository(engine)
    repo.create_service("orders", [AudienceGrant("billing", ("billing.read",))], b"h1", T0)
    repo.update_service_secret("orders", b"h2", at(1), at(1000))
    repo.create_service("ops", [AudienceGrant("authsvc", ("authsvc.admin",))], b"o1", T0)
    repo.update_service_disabled("ops", True, at(2))
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO changes (kind, ref, created_at) VALUES ('key', 'k1', :t)"),
            {"t": at(3)},
        )
        conn.execute(
            sa.text("DELETE FROM changes WHERE cursor = (SELECT max(cursor) FROM changes)")
        )


class TestMigration0007:
    def test_upgrade_keeps_services_secrets_and_changes(self, engine: Engine) -> None:
        _to(engine, "0006")
        _rows_at_0006(engine)
        before = _changes(engine)
        assert [kind for _, kind, _ in before] == ["service"] * 3
        _to(engine, "0007")
        assert migrate.current_revision(engine) == "0007"
        assert _NEW_TABLES <= _tables(engine)
        repo = Repository(engine)
        orders = repo.fetch_service("orders")
        assert orders is not None and orders.scopes_for("billing") == ("billing.read",)
        ops = repo.fetch_service("ops")
        assert ops is not None and ops.disabled
        assert live_secrets(repo, "orders", at(5)) == [("current", b"h2"), ("previous", b"h1")]
        assert live_secrets(repo, "ops", at(5)) == [("current", b"o1")]
        assert _changes(engine) == before
        # Services from before have a secret and nothing else.
        listed = repo.list_service_credentials()
        assert {sid: c.kinds for sid, c in listed.items()} == {
            "ops": ("secret",),
            "orders": ("secret",),
        }
        # The cursor counter survived the rebuild: the deleted row's cursor is not reused.
        repo.create_trust(_trust(), at(6))
        trust_change = _changes(engine)[-1]
        assert trust_change[1:] == ("trust", "gh")
        assert trust_change[0] == before[-1][0] + 2

    def test_the_changes_check_takes_trust_and_still_refuses_the_unknown(
        self, engine: Engine
    ) -> None:
        _to(engine, "0007")
        insert = sa.text("INSERT INTO changes (kind, ref, created_at) VALUES (:k, 'r', :t)")
        with engine.begin() as conn:
            conn.execute(insert, {"k": "trust", "t": T0})
        with pytest.raises(sa_exc.IntegrityError), engine.begin() as conn:
            conn.execute(insert, {"k": "bogus", "t": T0})
        assert [kind for _, kind, _ in _changes(engine)] == ["trust"]

    def test_the_migrated_schema_matches_the_models(self, engine: Engine) -> None:
        _to(engine, "0007")
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": True}
            )
            assert compare_metadata(context, Base.metadata) == []

    def test_downgrade_keeps_what_0006_knew_and_upgrades_again(self, engine: Engine) -> None:
        _to(engine, "0006")
        _rows_at_0006(engine)
        _to(engine, "0007")
        repo = Repository(engine)
        repo.create_trust(_trust(), at(6))
        repo.create_service(
            "workload",
            [AudienceGrant("billing", ())],
            None,
            at(7),
            [CredentialRecord("federated", "gh", "repo:acme/x")],
        )
        with repo.login_batch(at(8), 60) as batch:
            assert batch.use_assertion("orders", "jti-1", at(60))
        kept = [c for c in _changes(engine) if c[1] != "trust"]

        _to(engine, "0006", down=True)
        assert migrate.current_revision(engine) == "0006"
        assert not _NEW_TABLES & _tables(engine)
        assert _changes(engine) == kept
        insert = sa.text("INSERT INTO changes (kind, ref, created_at) VALUES ('trust', 'r', :t)")
        with pytest.raises(sa_exc.IntegrityError), engine.begin() as conn:
            conn.execute(insert, {"t": T0})
        # The secretless service stays (0006 can hold it; it just cannot log in there).
        assert repo.fetch_service("workload") is not None
        assert live_secrets(repo, "orders", at(9)) == [("current", b"h2"), ("previous", b"h1")]

        _to(engine, "0007")
        assert repo.list_trusts() == []
        assert repo.fetch_service_credentials("workload") is not None
        assert repo.fetch_service_credentials("orders").has_secret  # type: ignore[union-attr]
        repo.create_trust(_trust(), at(10))
        assert _changes(engine)[-1][0] > kept[-1][0]


def _trust() -> TrustRecord:
    return TrustRecord(
        name="gh",
        issuer="https://token.actions.example",
        audience="authsvc",
        jwks_json='{"keys":[]}',
        jwks_url=None,
        max_lifetime_seconds=3600,
        created_at=T0,
    )
