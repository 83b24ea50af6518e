"""Migration 0005 on a database written before it: every existing secret keeps logging in.

Until 0005 the secret-hash key was derived from the KEK; the revision stores that very value,
wrapped, so nothing has to be re-issued. It needs the KEK to do so, and a missing or wrong KEK
leaves the database as it was.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from alembic import command
from cryptography.hazmat.primitives.asymmetric import rsa

from authsvc.crypto.kek import KekRing, KeyEncryptionKey, serialize_private_key
from authsvc.crypto.secrets import SecretHasher, mint_secret
from authsvc.errors import ConfigError
from authsvc.keys.jwks import jwk_thumbprint, public_jwk
from authsvc.storage import migrate
from authsvc.storage.engine import make_engine
from tests.support.server import TEST_KEK, base_env, start_server

# What authsvc.server.app derived the secret-hash key with before 0005.
_LEGACY_PURPOSE = b"authsvc/service-secret-hash/v1"

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
_keys = sa.Table(
    "signing_keys", _legacy,
    sa.Column("kid", sa.String), sa.Column("state", sa.String),
    sa.Column("created_at", _TS), sa.Column("activated_at", _TS),
    sa.Column("retired_at", _TS), sa.Column("publish_until", _TS),
    sa.Column("public_jwk", sa.Text), sa.Column("private_key_enc", sa.LargeBinary),
)  # fmt: skip


def _legacy_database(url: str) -> tuple[str, str]:
    """A database at 0002 written as the code before 0005 wrote it: a service with a secret
    hashed under the KEK-derived key, an active key wrapped without a kek id. Returns
    (secret, kid)."""
    kek = KeyEncryptionKey.from_base64(TEST_KEK)
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    kid = jwk_thumbprint(private.public_key())
    secret = mint_secret()
    now = datetime.now(UTC)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            cfg = migrate._config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0002")
            conn.commit()
        with engine.begin() as conn:
            conn.execute(
                _services.insert().values(
                    service_id="orders", audiences='["api"]', scopes="[]", disabled=False,
                    created_at=now, updated_at=now,
                )
            )  # fmt: skip
            conn.execute(
                _secrets.insert().values(
                    service_id="orders", slot="current",
                    secret_hash=SecretHasher(kek.derive(_LEGACY_PURPOSE)).hash(secret),
                    created_at=now, expires_at=None,
                )
            )  # fmt: skip
            conn.execute(
                _keys.insert().values(
                    kid=kid, state="active", created_at=now, activated_at=now, retired_at=None,
                    publish_until=None,
                    public_jwk=json.dumps(public_jwk(private.public_key(), kid)),
                    private_key_enc=kek.wrap(serialize_private_key(private), kid=kid),
                )
            )  # fmt: skip
    finally:
        engine.dispose()
    return secret, kid


def _revision(url: str) -> str | None:
    engine = make_engine(url)
    try:
        return migrate.current_revision(engine)
    finally:
        engine.dispose()


def _upgrade(url: str, ring: KekRing | None) -> None:
    engine = make_engine(url)
    try:
        migrate.upgrade(engine, ring)
    finally:
        engine.dispose()


class TestMigration0005KeepsExistingSecrets:
    def test_a_secret_issued_before_the_migration_still_logs_in(self, database_url: str) -> None:
        secret, kid = _legacy_database(database_url)
        server = start_server(base_env(database_url))  # `serve` migrates with its KEK
        try:
            reply = server.issue("orders", secret, "api")
            assert reply.key_id == kid
        finally:
            server.stop()
        assert _revision(database_url) == migrate.head_revision()

    def test_without_the_kek_or_with_a_wrong_one_nothing_changes(self, database_url: str) -> None:
        _legacy_database(database_url)
        with pytest.raises(ConfigError, match="AUTHSVC_KEK"):
            _upgrade(database_url, None)
        # Short of 0005: PostgreSQL rolls the whole upgrade back, SQLite keeps 0003-0004.
        assert _revision(database_url) in {"0002", "0004"}
        with pytest.raises(ConfigError, match="AUTHSVC_KEK"):
            _upgrade(database_url, KekRing(KeyEncryptionKey.from_base64(
                "3q2+7wABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhs="
            )))  # fmt: skip
        assert _revision(database_url) in {"0002", "0004"}

    def test_an_empty_database_needs_no_kek(self, database_url: str) -> None:
        _upgrade(database_url, None)
        assert _revision(database_url) == migrate.head_revision()


def _downgrade(url: str, ring: KekRing | None) -> None:
    """`alembic downgrade 0004` as an operator would run it, with the server's KEKs given."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            cfg = migrate._config()
            cfg.attributes["connection"] = conn
            cfg.attributes["kek_ring"] = ring
            command.downgrade(cfg, "0004")
            conn.commit()
    finally:
        engine.dispose()


class TestMigration0005Downgrade:
    """Dropping the stored secret-hash key is safe only when the older code derives the same
    one from its KEK; otherwise every stored secret would stop logging in at once."""

    def _at_0005(self, url: str) -> None:
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                cfg = migrate._config()
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "0005")
                conn.commit()
        finally:
            engine.dispose()

    def test_a_key_adopted_from_the_kek_may_go_back(self, database_url: str) -> None:
        _legacy_database(database_url)
        ring = KekRing(KeyEncryptionKey.from_base64(TEST_KEK))
        _upgrade(database_url, ring)
        # 0006 and 0007 go first; they hold nothing this database needs.
        _downgrade(database_url, ring)
        assert _revision(database_url) == "0004"

    def test_a_random_key_or_no_kek_refuses(self, database_url: str) -> None:
        self._at_0005(database_url)
        kek = KeyEncryptionKey.from_base64(TEST_KEK)
        now = datetime.now(UTC)
        engine = make_engine(database_url)
        try:
            with engine.begin() as conn:
                conn.execute(
                    _services.insert().values(
                        service_id="orders", audiences='["api"]', scopes="[]", disabled=False,
                        created_at=now, updated_at=now,
                    )
                )  # fmt: skip
                random_key = bytes(range(32))  # as a database made at 0005 stores one
                conn.execute(
                    _secrets.insert().values(
                        service_id="orders", slot="current",
                        secret_hash=SecretHasher(random_key).hash(mint_secret()),
                        created_at=now, expires_at=None,
                    )
                )  # fmt: skip
                conn.execute(
                    sa.text(
                        "INSERT INTO wrapped_keys (name, kek_id, wrapped, updated_at) "
                        "VALUES ('secret-hash', :kek_id, :wrapped, :now)"
                    ),
                    {
                        "kek_id": kek.kek_id,
                        "wrapped": kek.wrap_named(random_key, name="secret-hash"),
                        "now": now,
                    },
                )
        finally:
            engine.dispose()
        for ring in (KekRing(kek), None):
            with pytest.raises(RuntimeError, match="cannot downgrade below 0005"):
                _downgrade(database_url, ring)
            assert _revision(database_url) == "0005"
