"""Engine set-up, migrations, unavailability and restarts, on SQLite and PostgreSQL."""

from __future__ import annotations

import socket
import threading
import traceback
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, text
from sqlalchemy import exc as sa_exc

from authsvc.errors import StorageUnavailable
from authsvc.storage import migrate
from authsvc.storage.engine import READ_ONLY, make_engine
from authsvc.storage.models import Base
from authsvc.storage.records import AudienceGrant
from authsvc.storage.repository import Repository
from tests.storage.helpers import T0, at, key_record, live_secrets


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TestMakeEngine:
    def test_sqlite_runs_in_wal_with_foreign_keys_and_a_busy_timeout(self, tmp_path: Path) -> None:
        engine = make_engine(f"sqlite:///{tmp_path / 'a.db'}")
        try:
            with engine.connect() as conn:
                pragma = {
                    name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                    for name in ("journal_mode", "foreign_keys", "busy_timeout", "synchronous")
                }
            # synchronous: 1 = NORMAL
            assert pragma == {
                "journal_mode": "wal",
                "foreign_keys": 1,
                "busy_timeout": 5000,
                "synchronous": 1,
            }
        finally:
            engine.dispose()

    def test_plain_postgresql_url_uses_psycopg(self) -> None:
        engine = make_engine("postgresql://u@127.0.0.1:1/db")
        try:
            assert engine.url.drivername == "postgresql+psycopg"
            assert engine.pool.size() == 5  # type: ignore[attr-defined]
        finally:
            engine.dispose()

    @pytest.mark.parametrize("url", ["mysql://u@h/db", "postgresql+psycopg2://u@h/db"])
    def test_other_databases_are_refused_without_echoing_the_url(self, url: str) -> None:
        with pytest.raises(ValueError) as info:
            make_engine(url.replace("u@", "u:hunter2@"))
        assert "hunter2" not in str(info.value)

    def test_read_only_transactions_cannot_write(self, engine: Engine) -> None:
        with (
            pytest.raises(sa_exc.DBAPIError),
            engine.connect().execution_options(**{READ_ONLY: True}) as conn,
            conn.begin(),
        ):
            conn.execute(text("DELETE FROM services"))
        # The same pooled connection writes again once the option is gone.
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM services"))

    def test_a_sqlite_reader_is_not_blocked_by_an_open_writer(self, tmp_path: Path) -> None:
        url = f"sqlite:///{tmp_path / 'a.db'}"
        writer_engine, reader_engine = make_engine(url), make_engine(url)
        try:
            migrate.upgrade(writer_engine)
            Repository(writer_engine).create_service("svc", [AudienceGrant("x", ())], b"h", T0)
            with writer_engine.begin() as conn:  # holds the write lock (BEGIN IMMEDIATE)
                conn.execute(text("UPDATE services SET disabled = true"))
                # WAL: the reader sees the last committed state, at once.
                assert Repository(reader_engine).list_disabled_service_ids() == []
            assert Repository(reader_engine).list_disabled_service_ids() == ["svc"]
        finally:
            writer_engine.dispose()
            reader_engine.dispose()


class TestMigrations:
    def test_empty_database_has_no_revision(self, database_url: str) -> None:
        engine = make_engine(database_url)
        try:
            assert migrate.current_revision(engine) is None
            assert not migrate.is_current(engine)
        finally:
            engine.dispose()

    def test_upgrade_reaches_head_and_is_idempotent(self, engine: Engine) -> None:
        assert migrate.head_revision() == "0007"
        assert migrate.current_revision(engine) == migrate.head_revision()
        assert migrate.is_current(engine)
        migrate.upgrade(engine)
        assert migrate.is_current(engine)

    def test_0003_keeps_older_audit_rows_as_single_events_and_downgrades(
        self, database_url: str
    ) -> None:
        engine = make_engine(database_url)
        cfg = Config()
        cfg.set_main_option("script_location", migrate.SCRIPT_LOCATION)
        try:
            with engine.connect() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "0002")
                conn.commit()
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "INSERT INTO audit_events (at, actor, action, target, outcome, peer,"
                        " request_id, detail) VALUES (:at, 'cli', 'create_service',"
                        " 'service:x', 'ok', 'local', 'old', '')"
                    ),
                    {"at": T0},
                )
            migrate.upgrade(engine)
            (row,) = Repository(engine).list_audit_events()
            assert (row.request_id, row.count, row.first_at) == ("old", 1, None)
            with engine.connect() as conn:
                cfg.attributes["connection"] = conn
                command.downgrade(cfg, "0002")
                conn.commit()
            assert migrate.current_revision(engine) == "0002"
        finally:
            engine.dispose()

    def test_0004_gives_existing_revocations_their_kind(self, database_url: str) -> None:
        # Before 0004 a disable was told apart only by the reason disable_service wrote.
        from alembic import command

        engine = make_engine(database_url)
        try:
            cfg = migrate._config()
            with engine.connect() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "0002")
                conn.commit()
            with engine.begin() as conn:
                for jti, service, reason in [
                    ("j1", None, "leaked"),
                    (None, "orders", "rotated out"),
                    (None, "billing", "service disabled"),
                ]:
                    conn.execute(
                        text(
                            "INSERT INTO revocations (jti, service_id, revoked_before, expires_at,"
                            " reason, created_at) VALUES (:j, :s, :t, :t, :r, :t)"
                        ),
                        {"j": jti, "s": service, "t": T0, "r": reason},
                    )
            migrate.upgrade(engine)
            with engine.connect() as conn:
                kinds = conn.execute(
                    text("SELECT reason, kind FROM revocations ORDER BY cursor")
                ).all()
            assert [tuple(k) for k in kinds] == [
                ("leaked", "token"),
                ("rotated out", "service_tokens"),
                ("service disabled", "service_disabled"),
            ]
        finally:
            engine.dispose()

    def test_migrated_schema_matches_the_models(self, engine: Engine) -> None:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": True}
            )
            assert compare_metadata(context, Base.metadata) == []

    def test_two_active_keys_are_impossible_even_bypassing_the_repository(
        self, engine: Engine, repo: Repository
    ) -> None:
        # The partial unique index (compare_metadata cannot see its WHERE clause).
        repo.create_signing_key(key_record("k1"), T0, expected_active_kid=None, publish_until=T0)
        with pytest.raises(sa_exc.IntegrityError), engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO signing_keys (kid, state, created_at, public_jwk) "
                    "VALUES ('k2', 'active', :t, '{}')"
                ),
                {"t": T0},
            )
        # ...while any number of retired keys may coexist.
        repo.create_signing_key(
            key_record("k2"), at(1), expected_active_kid="k1", publish_until=at(9)
        )
        repo.create_signing_key(
            key_record("k3"), at(2), expected_active_kid="k2", publish_until=at(9)
        )
        assert sorted(k.state for k in repo.list_signing_keys()) == ["active", "retired", "retired"]

    def test_replicas_upgrading_at_once_all_succeed(self, database_url: str) -> None:
        engines = [make_engine(database_url) for _ in range(3)]
        errors: list[BaseException] = []
        barrier = threading.Barrier(len(engines))

        def run(engine: Engine) -> None:
            try:
                barrier.wait(timeout=30)
                migrate.upgrade(engine)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(e,)) for e in engines]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            assert errors == []
            assert all(migrate.is_current(e) for e in engines)
        finally:
            for e in engines:
                e.dispose()


class TestUnavailable:
    def _assert_opaque(self, exc: BaseException, *secrets: str) -> None:
        assert isinstance(exc, StorageUnavailable)
        assert str(exc) == "database unavailable"
        text_ = "".join(traceback.format_exception(exc))
        for secret in secrets:
            assert secret not in text_

    @pytest.mark.postgres
    def test_postgres_on_a_closed_port(self) -> None:
        port = _closed_port()
        engine = make_engine(f"postgresql+psycopg://authsvc:Sup3rS3cret@127.0.0.1:{port}/authsvc")
        repo = Repository(engine)
        try:
            with pytest.raises(StorageUnavailable) as info:
                repo.ping()
            self._assert_opaque(info.value, "Sup3rS3cret")
            assert f":{port}/" not in str(info.value)
            with pytest.raises(StorageUnavailable) as info:
                repo.create_service("svc", [AudienceGrant("x", ())], b"h", T0)
            self._assert_opaque(info.value, "Sup3rS3cret")
        finally:
            engine.dispose()

    def test_sqlite_file_that_cannot_be_opened(self, tmp_path: Path) -> None:
        path = tmp_path / "missing-dir" / "authsvc.db"
        engine = make_engine(f"sqlite:///{path}")
        try:
            with pytest.raises(StorageUnavailable) as info:
                Repository(engine).fetch_service("svc")
            self._assert_opaque(info.value)
            assert str(path) not in str(info.value)
        finally:
            engine.dispose()

    def test_a_dead_pooled_connection_is_replaced(self, engine: Engine, repo: Repository) -> None:
        repo.create_service("svc", [AudienceGrant("x", ())], b"h", T0)
        with engine.connect() as conn:
            # Close the driver connection under the pool, as a database restart would.
            conn.connection.dbapi_connection.close()  # type: ignore[union-attr]
        assert repo.fetch_service("svc") is not None


class TestRestart:
    def test_a_new_engine_sees_everything_committed(self, database_url: str) -> None:
        first = make_engine(database_url)
        try:
            migrate.upgrade(first)
            repo = Repository(first)
            repo.create_service("svc", [AudienceGrant("aud", ("s",))], b"h", T0)
            repo.create_signing_key(
                key_record("k1"), T0, expected_active_kid=None, publish_until=T0
            )
            revoked = repo.create_revocation(
                jti="j",
                service_id=None,
                revoked_before=None,
                expires_at=at(900),
                reason="r",
                now=T0,
            )
        finally:
            first.dispose()
        second = make_engine(database_url)
        try:
            assert migrate.is_current(second)
            repo = Repository(second)
            assert repo.fetch_service("svc").scopes == ("s",)  # type: ignore[union-attr]
            assert repo.fetch_active_signing_key().kid == "k1"  # type: ignore[union-attr]
            assert repo.list_revocations(0, T0) == [revoked]
            assert [h for _, h in live_secrets(repo, "svc", T0)] == [b"h"]
        finally:
            second.dispose()
