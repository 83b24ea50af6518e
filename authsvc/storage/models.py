"""SQLAlchemy models: the one schema the migrations create on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite batch migrations recreate tables and need every constraint to have a stable name.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_name)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ID_LENGTH = 255
TS = DateTime(timezone=True)
# Cursors must never be reused after a prune (a follower would skip rows): BIGSERIAL on
# PostgreSQL, INTEGER PRIMARY KEY AUTOINCREMENT on SQLite (only INTEGER may alias the rowid).
CURSOR = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ServiceRow(Base):
    __tablename__ = "services"

    service_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    # JSON object {audience: [scope, ...]} in the order granted (migration 0006; it replaced the
    # `audiences` and `scopes` arrays, which gave every audience every scope). One column, so a
    # login still reads its service in one row (LoginBatch).
    grants: Mapped[str] = mapped_column(Text, server_default="{}")
    disabled: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(TS)
    updated_at: Mapped[datetime] = mapped_column(TS)


class ServiceSecretRow(Base):
    __tablename__ = "service_secrets"
    __table_args__ = (CheckConstraint("slot IN ('current', 'previous')", name="slot"),)

    service_id: Mapped[str] = mapped_column(
        String(ID_LENGTH),
        ForeignKey("services.service_id", ondelete="CASCADE"),
        primary_key=True,
    )
    slot: Mapped[str] = mapped_column(String(16), primary_key=True)
    secret_hash: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(TS)
    expires_at: Mapped[datetime | None] = mapped_column(TS)


class SigningKeyRow(Base):
    __tablename__ = "signing_keys"
    __table_args__ = (
        CheckConstraint("state IN ('next', 'active', 'retired', 'revoked')", name="state"),
        # At most one active key, enforced by the database whoever races.
        Index(
            "uq_signing_keys_one_active",
            "state",
            unique=True,
            sqlite_where=text("state = 'active'"),
            postgresql_where=text("state = 'active'"),
        ),
    )

    kid: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(TS)
    activated_at: Mapped[datetime | None] = mapped_column(TS)
    retired_at: Mapped[datetime | None] = mapped_column(TS)
    publish_until: Mapped[datetime | None] = mapped_column(TS)
    public_jwk: Mapped[str] = mapped_column(Text)
    private_key_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    # Which KEK wraps private_key_enc (KeyEncryptionKey.kek_id; migration 0005).
    kek_id: Mapped[str | None] = mapped_column(String(32))


class WrappedKeyRow(Base):
    """Key material other than signing keys, wrapped under the KEK (migration 0005).

    The secret-hash key lives here; its row's kek_id names the KEK the deployment wraps under.
    """

    __tablename__ = "wrapped_keys"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    kek_id: Mapped[str] = mapped_column(String(32))
    wrapped: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[datetime] = mapped_column(TS)


class RevocationRow(Base):
    __tablename__ = "revocations"
    __table_args__ = (
        CheckConstraint("(jti IS NULL) <> (service_id IS NULL)", name="one_target"),
        Index(
            "uq_revocations_jti",
            "jti",
            unique=True,
            sqlite_where=text("jti IS NOT NULL"),
            postgresql_where=text("jti IS NOT NULL"),
        ),
        {"sqlite_autoincrement": True},
    )

    cursor: Mapped[int] = mapped_column(CURSOR, primary_key=True, autoincrement=True)
    jti: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    service_id: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    revoked_before: Mapped[datetime | None] = mapped_column(TS)
    expires_at: Mapped[datetime] = mapped_column(TS, index=True)
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(TS)
    # RevocationKind; added by migration 0004.
    kind: Mapped[str] = mapped_column(String(32), server_default="token")


class ChangeRow(Base):
    __tablename__ = "changes"
    __table_args__ = (
        # 'trust': migration 0007 (a trusted issuer added or removed).
        CheckConstraint("kind IN ('key', 'service', 'trust')", name="kind"),
        {"sqlite_autoincrement": True},
    )

    cursor: Mapped[int] = mapped_column(CURSOR, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))
    ref: Mapped[str] = mapped_column(String(ID_LENGTH))
    created_at: Mapped[datetime] = mapped_column(TS)


class AuditEventRow(Base):
    """One audited event, or (aggregate_key set, migration 0003) every unauthenticated attempt
    of one kind for one throttle key within one throttle window: `count` of them, from
    `first_at` to `at`. An attacker's throttled or unknown-id logins cost O(1) rows so."""

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("uq_audit_events_aggregate_key", "aggregate_key", unique=True),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(CURSOR, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(TS, index=True)
    actor: Mapped[str] = mapped_column(Text)
    action: Mapped[str] = mapped_column(Text)
    target: Mapped[str] = mapped_column(Text)
    outcome: Mapped[str] = mapped_column(Text)
    peer: Mapped[str] = mapped_column(Text)
    request_id: Mapped[str] = mapped_column(Text)
    detail: Mapped[str] = mapped_column(Text)
    count: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    first_at: Mapped[datetime | None] = mapped_column(TS)
    aggregate_key: Mapped[str | None] = mapped_column(Text)


class AuthFailureRow(Base):
    __tablename__ = "auth_failures"

    key: Mapped[str] = mapped_column(String(512), primary_key=True)
    count: Mapped[int] = mapped_column(Integer)
    window_start: Mapped[datetime] = mapped_column(TS)
    last_failure_at: Mapped[datetime] = mapped_column(TS)


class KnownPeerRow(Base):
    """Where a service id last logged in successfully (migration 0002)."""

    __tablename__ = "known_peers"

    service_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    peer: Mapped[str] = mapped_column(String(512), primary_key=True)
    last_success_at: Mapped[datetime] = mapped_column(TS, index=True)


# -- workload identity (migration 0007) -----------------------------------------------------------

# A SAN is stored as a credential's ref, and SPIFFE IDs may be 2048 bytes
# (authsvc.workload.certificates.MAX_SPIFFE_ID_LENGTH).
CREDENTIAL_REF_LENGTH = 2048


class ServiceCredentialRow(Base):
    """A way other than its secret for a service to log in (records.CredentialKind).

    A key id or SAN is registered once per service; a federated subject (ref = trust name,
    value = subject) belongs to one service fleet-wide, or a federated token could be exchanged
    for either of two services. Both rules are partial unique indexes, so replicas registering
    at once are settled by the database.
    """

    __tablename__ = "service_credentials"
    __table_args__ = (
        CheckConstraint("kind IN ('public_key', 'tls_san', 'federated')", name="kind"),
        Index(
            "uq_service_credentials_ref",
            "service_id",
            "kind",
            "ref",
            unique=True,
            sqlite_where=text("kind <> 'federated'"),
            postgresql_where=text("kind <> 'federated'"),
        ),
        Index(
            "uq_service_credentials_federated",
            "kind",
            "ref",
            "value",
            unique=True,
            sqlite_where=text("kind = 'federated'"),
            postgresql_where=text("kind = 'federated'"),
        ),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(CURSOR, primary_key=True, autoincrement=True)
    service_id: Mapped[str] = mapped_column(
        String(ID_LENGTH), ForeignKey("services.service_id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[str] = mapped_column(String(16))
    ref: Mapped[str] = mapped_column(String(CREDENTIAL_REF_LENGTH))
    value: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(TS)


class TrustedIssuerRow(Base):
    """An external issuer whose tokens may be exchanged for a bound service's tokens."""

    __tablename__ = "trusted_issuers"
    __table_args__ = (
        CheckConstraint("(jwks_json IS NULL) <> (jwks_url IS NULL)", name="one_key_source"),
    )

    name: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    issuer: Mapped[str] = mapped_column(Text, unique=True)
    audience: Mapped[str] = mapped_column(Text)
    jwks_json: Mapped[str | None] = mapped_column(Text)
    jwks_url: Mapped[str | None] = mapped_column(Text)
    max_lifetime_seconds: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(TS)
    updated_at: Mapped[datetime] = mapped_column(TS)


class UsedAssertionRow(Base):
    """A client assertion's jti, kept until the assertion expires so it cannot be replayed."""

    __tablename__ = "used_assertions"

    service_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    jti: Mapped[str] = mapped_column(String(256), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(TS, index=True)
