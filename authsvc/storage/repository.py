"""The repository: the only module issuing SQL; every method is one short transaction."""

from __future__ import annotations

import hmac
import json
from collections import namedtuple
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, cast, get_args

from sqlalchemy import (
    Connection,
    Engine,
    Row,
    Table,
    bindparam,
    case,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ClauseElement

from authsvc.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    StorageUnavailable,
)
from authsvc.storage.engine import READ_ONLY, write_lock
from authsvc.storage.models import (
    AuditEventRow,
    AuthFailureRow,
    ChangeRow,
    KnownPeerRow,
    RevocationRow,
    ServiceCredentialRow,
    ServiceRow,
    ServiceSecretRow,
    SigningKeyRow,
    TrustedIssuerRow,
    UsedAssertionRow,
    WrappedKeyRow,
)
from authsvc.storage.records import (
    SECRET_HASH_KEY,
    AudienceGrant,
    AuditRecord,
    ChangeKind,
    ChangeRecord,
    CredentialKind,
    CredentialRecord,
    HeldRevocation,
    KeyState,
    RevocationKind,
    RevocationRecord,
    SecretRecord,
    SecretSlot,
    ServiceCredentials,
    ServiceRecord,
    SigningKeyRecord,
    TrustRecord,
    WrappedKeyRecord,
)

__all__ = ["AuditEvent", "KekChanged", "LoginBatch", "NextActivation", "Repository"]

_Secret = tuple[SecretSlot, bytes]

# pg_advisory_xact_lock keys. Taken in this order only (rotation, then changes, then
# revocations: disable_service takes the last two), so they cannot deadlock; SQLite needs none
# of them since BEGIN IMMEDIATE admits one writer at a time.
_LOCK_ROTATION = 0x6175_7468_7376_0002
_LOCK_CHANGES = 0x6175_7468_7376_0003
_LOCK_REVOCATIONS = 0x6175_7468_7376_0004

_UNAVAILABLE = "database unavailable"


# What activating the `next` key came to (Repository.activate_next_signing_key).
NextActivation = Literal["activated", "already_rotated", "no_next"]


class KekChanged(FailedPrecondition):
    """A key was wrapped under a KEK that is no longer the one the database wraps under."""


@dataclass(frozen=True)
class AuditEvent:
    """An audit row written in the transaction of the change it records (the `audit` argument
    of the write methods that take one): the change and its row commit together or not at all,
    so a failed audit write never leaves a change its caller was told did not happen."""

    at: datetime
    actor: str
    action: str
    target: str
    outcome: str
    peer: str
    request_id: str
    detail: str = ""


def _utc_in(value: datetime) -> datetime:
    """Normalise a datetime before it is stored; SQLite keeps no offset, so it must be UTC."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("datetimes passed to storage must be timezone-aware")
    return value.astimezone(UTC)


def _opt_in(value: datetime | None) -> datetime | None:
    return None if value is None else _utc_in(value)


def _utc_out(value: datetime) -> datetime:
    # SQLite hands back naive values (stored as UTC); PostgreSQL hands back the session zone.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _opt_out(value: datetime | None) -> datetime | None:
    return None if value is None else _utc_out(value)


def _grants_json(grants: Sequence[AudienceGrant]) -> str:
    """The `grants` column: {audience: [scope, ...]}, audiences in the order granted."""
    return json.dumps({g.audience: list(g.scopes) for g in grants}, separators=(",", ":"))


def _grants(text: str) -> tuple[AudienceGrant, ...]:
    return tuple(AudienceGrant(a, tuple(scopes)) for a, scopes in json.loads(text).items())


def _service(row: ServiceRow | Row[Any]) -> ServiceRecord:
    return ServiceRecord(
        service_id=row.service_id,
        grants=_grants(row.grants),
        disabled=row.disabled,
        created_at=_utc_out(row.created_at),
        updated_at=_utc_out(row.updated_at),
    )


def _secret(row: ServiceSecretRow) -> SecretRecord:
    return SecretRecord(
        service_id=row.service_id,
        slot=cast(SecretSlot, row.slot),
        secret_hash=row.secret_hash,
        created_at=_utc_out(row.created_at),
        expires_at=_opt_out(row.expires_at),
    )


def _key(row: SigningKeyRow) -> SigningKeyRecord:
    return SigningKeyRecord(
        kid=row.kid,
        state=cast(KeyState, row.state),
        created_at=_utc_out(row.created_at),
        activated_at=_opt_out(row.activated_at),
        retired_at=_opt_out(row.retired_at),
        publish_until=_opt_out(row.publish_until),
        public_jwk=row.public_jwk,
        private_key_enc=row.private_key_enc,
        kek_id=row.kek_id,
    )


def _wrapped(row: WrappedKeyRow) -> WrappedKeyRecord:
    return WrappedKeyRecord(
        name=row.name, kek_id=row.kek_id, wrapped=row.wrapped, updated_at=_utc_out(row.updated_at)
    )


def _revocation(row: RevocationRow | Row[Any]) -> RevocationRecord:
    return RevocationRecord(
        cursor=row.cursor,
        jti=row.jti,
        service_id=row.service_id,
        revoked_before=_opt_out(row.revoked_before),
        expires_at=_utc_out(row.expires_at),
        reason=row.reason,
        created_at=_utc_out(row.created_at),
        kind=cast(RevocationKind, row.kind),
    )


def _change(row: ChangeRow) -> ChangeRecord:
    return ChangeRecord(
        cursor=row.cursor,
        kind=cast(ChangeKind, row.kind),
        ref=row.ref,
        created_at=_utc_out(row.created_at),
    )


def _audit(row: AuditEventRow) -> AuditRecord:
    return AuditRecord(
        id=row.id,
        at=_utc_out(row.at),
        actor=row.actor,
        action=row.action,
        target=row.target,
        outcome=row.outcome,
        peer=row.peer,
        request_id=row.request_id,
        detail=row.detail,
        count=row.count,
        first_at=_opt_out(row.first_at),
    )


_CREDENTIAL_KINDS = frozenset(get_args(CredentialKind))


def _credential(row: Row[*tuple[Any, ...]]) -> CredentialRecord:
    return CredentialRecord(cast(CredentialKind, row.kind), row.ref, row.value)


def _trust(row: TrustedIssuerRow) -> TrustRecord:
    return TrustRecord(
        name=row.name,
        issuer=row.issuer,
        audience=row.audience,
        jwks_json=row.jwks_json,
        jwks_url=row.jwks_url,
        max_lifetime_seconds=row.max_lifetime_seconds,
        created_at=_utc_out(row.created_at),
    )


def _identity(c: CredentialRecord) -> tuple[str, ...]:
    """What makes two of a service's credentials the same one, as the unique indexes see it:
    a key id or a SAN (whatever JWK it carries), or a federated (trust, subject) pair."""
    return (c.kind, c.ref, c.value) if c.kind == "federated" else (c.kind, c.ref)


def _describe(c: CredentialRecord) -> str:
    """A credential as messages name it: ids and subjects only, never key material."""
    if c.kind == "federated":
        return f"federated subject {c.value!r} of trust {c.ref!r}"
    if c.kind == "public_key":
        return f"public key {c.ref!r}"
    return f"TLS SAN {c.ref!r}"


def _check_credentials(credentials: Sequence[CredentialRecord]) -> None:
    """One request names each credential once (a second one would hit a unique index and be
    reported as a conflict with what is stored, which it is not).

    Raises:
        ValueError: a kind that is not a CredentialKind (a caller's bug).
        InvalidArgument: a credential given twice.
    """
    seen: set[tuple[str, ...]] = set()
    for c in credentials:
        if c.kind not in _CREDENTIAL_KINDS:
            raise ValueError(f"unknown credential kind {c.kind!r}")
        key = _identity(c)
        if key in seen:
            raise InvalidArgument(f"{_describe(c)} is given twice")
        seen.add(key)


@contextmanager
def _storage_errors() -> Iterator[None]:
    """Turn connection and transient failures into StorageUnavailable.

    The message is fixed: driver errors may name the host, and statements may carry values.
    """
    try:
        yield
    except (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError) as exc:
        raise StorageUnavailable(_UNAVAILABLE) from exc
    except sa_exc.DBAPIError as exc:
        if exc.connection_invalidated or _transient_sqlstate(exc):
            raise StorageUnavailable(_UNAVAILABLE) from exc
        raise


def _transient_sqlstate(exc: sa_exc.DBAPIError) -> bool:
    """PostgreSQL faults of the server, not of the statement: a read-only database (a standby
    after failover, or one set read-only for maintenance) and insufficient resources."""
    state = getattr(exc.orig, "sqlstate", None)
    return isinstance(state, str) and (state == "25006" or state.startswith("53"))


def _new_key_row(
    record: SigningKeyRecord,
    state: str,
    *,
    created_at: datetime,
    activated_at: datetime | None = None,
    publish_until: datetime | None = None,
) -> SigningKeyRow:
    """A signing key's first row: its public and wrapped private parts as generated."""
    return SigningKeyRow(
        kid=record.kid,
        state=state,
        created_at=created_at,
        activated_at=activated_at,
        retired_at=None,
        publish_until=publish_until,
        public_jwk=record.public_jwk,
        private_key_enc=record.private_key_enc,
        kek_id=record.kek_id,
    )


class Repository:
    """Storage for services, their secrets and workload credentials, trusted issuers, signing
    keys, revocations, changes, audit, throttling and used assertion ids.

    Each public method runs in its own transaction and never leaves one open. Read methods run
    read-only and always roll back. All datetimes in and out are timezone-aware (out: UTC).
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._postgres = engine.dialect.name == "postgresql"
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._login_sql = _LoginStatements(engine.dialect)

    # -- transactions -------------------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with _storage_errors(), self._sessions() as session:
            # Procure the connection with the option set, so the BEGIN it emits is read-only.
            session.connection(execution_options={READ_ONLY: True})
            try:
                yield session
            finally:
                session.rollback()

    @contextmanager
    def _write(self) -> Iterator[Session]:
        # Lock order: the process-local writer lock, then the database's (BEGIN IMMEDIATE).
        with (
            _storage_errors(),
            write_lock(self.engine),
            self._sessions() as session,
            session.begin(),
        ):
            session.connection()
            yield session

    def _advisory_lock(self, session: Session, key: int) -> None:
        """Serialize with other PostgreSQL writers until commit; SQLite already has one writer."""
        if self._postgres:
            session.execute(select(func.pg_advisory_xact_lock(key)))

    def _add_change(self, session: Session, kind: ChangeKind, ref: str, now: datetime) -> None:
        # Serialized so change rows commit in cursor order: a follower reading "cursor > N"
        # must never see N+2 before N+1 becomes visible.
        self._advisory_lock(session, _LOCK_CHANGES)
        session.add(ChangeRow(kind=kind, ref=ref, created_at=now))
        session.flush()

    def _add_audit(self, session: Session, event: AuditEvent | None) -> None:
        """Insert `event`'s row in the caller's transaction (nothing for None); flushed, so a
        failure of the insert rolls back everything the transaction wrote with it."""
        if event is None:
            return
        session.add(
            AuditEventRow(
                at=_utc_in(event.at),
                actor=event.actor,
                action=event.action,
                target=event.target,
                outcome=event.outcome,
                peer=event.peer,
                request_id=event.request_id,
                detail=event.detail,
            )
        )
        session.flush()

    # -- health -------------------------------------------------------------------------------

    def ping(self) -> None:
        """Raises StorageUnavailable when the database cannot answer."""
        with self._read() as s:
            s.execute(text("SELECT 1"))

    # -- services -----------------------------------------------------------------------------

    def create_service(
        self,
        service_id: str,
        grants: Sequence[AudienceGrant],
        secret_hash: bytes | None,
        now: datetime,
        credentials: Sequence[CredentialRecord] = (),
        *,
        audit: AuditEvent | None = None,
    ) -> ServiceRecord:
        """Register a service with its grants, its first ('current') secret and its workload
        credentials, and its `audit` row, in one transaction.

        `secret_hash` None: a secretless service (no service_secrets row), which logs in with
        its `credentials` only. The caller decides whether a service may have no way in.

        Raises:
            AlreadyExists: a service with this id exists, or a federated subject in
                `credentials` is bound to another service.
            FailedPrecondition: a federated subject names a trust that does not exist.
            InvalidArgument: a credential is given twice.
        """
        now = _utc_in(now)
        credentials = tuple(credentials)
        _check_credentials(credentials)
        try:
            with self._write() as s:
                if s.get(ServiceRow, service_id) is not None:
                    raise AlreadyExists(f"service {service_id!r} already exists")
                row = ServiceRow(
                    service_id=service_id,
                    grants=_grants_json(grants),
                    disabled=False,
                    created_at=now,
                    updated_at=now,
                )
                s.add(row)
                if secret_hash is not None:
                    s.add(
                        ServiceSecretRow(
                            service_id=service_id,
                            slot="current",
                            secret_hash=secret_hash,
                            created_at=now,
                            expires_at=None,
                        )
                    )
                s.flush()
                self._bind_credentials(s, service_id, credentials, now)
                self._add_change(s, "service", service_id, now)
                self._add_audit(s, audit)
                return _service(row)
        except sa_exc.IntegrityError:
            # A concurrent create or update on another replica won the race.
            raise self._conflict(service_id, credentials, creating=True) from None

    def fetch_service(self, service_id: str) -> ServiceRecord | None:
        with self._read() as s:
            row = s.get(ServiceRow, service_id)
            return None if row is None else _service(row)

    def list_services(self) -> list[ServiceRecord]:
        with self._read() as s:
            rows = s.scalars(select(ServiceRow).order_by(ServiceRow.service_id))
            return [_service(r) for r in rows]

    def update_service_disabled(
        self,
        service_id: str,
        disabled: bool,
        now: datetime,
        *,
        audit: AuditEvent | None = None,
    ) -> ServiceRecord:
        """Set a service's disabled flag, with its `audit` row, in one transaction. Disabling
        a service for good goes through disable_service, which revokes its tokens with it.

        Raises:
            NotFound: no such service.
        """
        now = _utc_in(now)
        with self._write() as s:
            row = self._set_disabled(s, service_id, disabled, now)
            self._add_audit(s, audit)
            return _service(row)

    def disable_service(
        self,
        service_id: str,
        now: datetime,
        *,
        revoked_before: datetime,
        revocation_expires_at: datetime,
        reason: str,
        audit: AuditEvent | None = None,
    ) -> ServiceRecord:
        """Disable a service and revoke its tokens issued before `revoked_before` (a
        "service_disabled" revocation kept until `revocation_expires_at`), with the 'service'
        change and the `audit` row, in one transaction: local validators follow the
        revocations only, so a disable must never commit without its revocation.

        Raises:
            NotFound: no such service.
        """
        now = _utc_in(now)
        with self._write() as s:
            row = self._set_disabled(s, service_id, True, now)
            self._add_revocation(
                s,
                jti=None,
                service_id=service_id,
                revoked_before=revoked_before,
                expires_at=revocation_expires_at,
                reason=reason,
                now=now,
                kind="service_disabled",
            )
            self._add_audit(s, audit)
            return _service(row)

    def _set_disabled(
        self, s: Session, service_id: str, disabled: bool, now: datetime
    ) -> ServiceRow:
        row = s.get(ServiceRow, service_id)
        if row is None:
            raise NotFound(f"service {service_id!r} not found")
        row.disabled = disabled
        row.updated_at = now
        s.flush()
        self._add_change(s, "service", service_id, now)
        return row

    def update_service_grants(
        self,
        service_id: str,
        change: Callable[[ServiceRecord], Sequence[AudienceGrant]],
        now: datetime,
        *,
        audit: Callable[[ServiceRecord, ServiceRecord], AuditEvent] | None = None,
    ) -> tuple[ServiceRecord, ServiceRecord]:
        """Replace a service's grants with `change(service)`; returns (before, after).

        `change` runs inside the transaction on the row as committed, locked (PostgreSQL;
        SQLite has one writer), so two updates of one service made at once on two replicas
        apply one after the other and neither is lost. What it raises rolls the update back.
        Unchanged grants write nothing but the audit row. `audit(before, after)` gives the
        update's audit row, written in the same transaction.

        Raises:
            NotFound: no such service.
        """
        now = _utc_in(now)
        with self._write() as s:
            row = s.get(ServiceRow, service_id, with_for_update=True)
            if row is None:
                raise NotFound(f"service {service_id!r} not found")
            before = _service(row)
            grants = tuple(change(before))
            if grants == before.grants:
                self._add_audit(s, None if audit is None else audit(before, before))
                return before, before
            row.grants = _grants_json(grants)
            row.updated_at = now
            s.flush()
            self._add_change(s, "service", service_id, now)
            after = _service(row)
            self._add_audit(s, None if audit is None else audit(before, after))
            return before, after

    def fetch_service_cutoff(self, service_id: str) -> datetime | None:
        """The latest `revoked_before` of the revocations of a service's tokens (a disable or
        a revoke-by-service), if any: its tokens issued before it stay revoked."""
        with self._read() as s:
            cutoff = s.scalar(
                select(func.max(RevocationRow.revoked_before)).where(
                    RevocationRow.service_id == service_id
                )
            )
            return _opt_out(cutoff)

    def list_disabled_service_ids(self) -> list[str]:
        with self._read() as s:
            ids = s.scalars(
                select(ServiceRow.service_id)
                .where(ServiceRow.disabled.is_(True))
                .order_by(ServiceRow.service_id)
            )
            return list(ids)

    # -- workload credentials (issue 14) --------------------------------------------------------

    def _bind_credentials(
        self, s: Session, service_id: str, credentials: Sequence[CredentialRecord], now: datetime
    ) -> None:
        """Insert a service's new credentials, after the checks the indexes cannot name.

        A federated subject's trust is read FOR SHARE: delete_trust locks it FOR UPDATE before
        it deletes the trust's bindings, so a binding made meanwhile is either seen and deleted
        by it or refused here, never left behind for a later trust of the same name.
        """
        for c in credentials:
            if c.kind != "federated":
                continue
            trust = s.scalar(
                select(TrustedIssuerRow.name)
                .where(TrustedIssuerRow.name == c.ref)
                .with_for_update(read=True)
            )
            if trust is None:
                raise FailedPrecondition(f"no trust named {c.ref!r}")
            bound = self._bound_to(s, c.ref, c.value)
            if bound is not None:
                raise AlreadyExists(f"{_describe(c)} is already bound to service {bound!r}")
        if credentials:
            s.execute(
                insert(ServiceCredentialRow),
                [
                    {
                        "service_id": service_id,
                        "kind": c.kind,
                        "ref": c.ref,
                        "value": c.value,
                        "created_at": now,
                    }
                    for c in credentials
                ],
            )

    def _bound_to(self, s: Session, trust: str, subject: str) -> str | None:
        return s.scalar(
            select(ServiceCredentialRow.service_id).where(
                ServiceCredentialRow.kind == "federated",
                ServiceCredentialRow.ref == trust,
                ServiceCredentialRow.value == subject,
            )
        )

    def _conflict(
        self, service_id: str, credentials: Sequence[CredentialRecord], *, creating: bool
    ) -> AlreadyExists:
        """What a unique violation was about, read after the losing transaction rolled back
        (the driver's message names columns, and may carry values)."""
        with self._read() as s:
            if creating and s.get(ServiceRow, service_id) is not None:
                return AlreadyExists(f"service {service_id!r} already exists")
            held = {_identity(c) for c in self._credential_rows(s, service_id)}
            for c in credentials:
                if c.kind == "federated":
                    bound = self._bound_to(s, c.ref, c.value)
                    if bound is not None and bound != service_id:
                        return AlreadyExists(
                            f"{_describe(c)} is already bound to service {bound!r}"
                        )
                elif _identity(c) in held:
                    return AlreadyExists(f"service {service_id!r} already has {_describe(c)}")
        return AlreadyExists(f"a credential of service {service_id!r} is already registered")

    def _credential_rows(self, s: Session, service_id: str) -> list[CredentialRecord]:
        rows = s.execute(
            select(ServiceCredentialRow.kind, ServiceCredentialRow.ref, ServiceCredentialRow.value)
            .where(ServiceCredentialRow.service_id == service_id)
            .order_by(ServiceCredentialRow.id)
        )
        return [_credential(r) for r in rows]

    def _service_credentials(self, s: Session, service_id: str) -> ServiceCredentials:
        has_secret = (
            s.scalar(
                select(ServiceSecretRow.slot)
                .where(ServiceSecretRow.service_id == service_id)
                .limit(1)
            )
            is not None
        )
        return ServiceCredentials.of(service_id, has_secret, self._credential_rows(s, service_id))

    def fetch_service_credentials(self, service_id: str) -> ServiceCredentials | None:
        """Everything but the secret a service may log in with; None: no such service."""
        with self._read() as s:
            if s.get(ServiceRow, service_id) is None:
                return None
            return self._service_credentials(s, service_id)

    def list_service_credentials(self) -> dict[str, ServiceCredentials]:
        """Every service's credentials by service id (`services list`), in one statement, so
        that a service created meanwhile is either wholly in it or not at all."""
        services = cast(Table, ServiceRow.__table__)
        creds = cast(Table, ServiceCredentialRow.__table__)
        secrets = cast(Table, ServiceSecretRow.__table__)
        has_secret = (
            select(secrets.c.slot)
            .where(secrets.c.service_id == services.c.service_id)
            .exists()
            .label("has_secret")
        )
        query = (
            select(services.c.service_id, has_secret, creds.c.kind, creds.c.ref, creds.c.value)
            .select_from(services.outerjoin(creds, creds.c.service_id == services.c.service_id))
            .order_by(services.c.service_id, creds.c.id)
        )
        found: dict[str, tuple[bool, list[CredentialRecord]]] = {}
        with self._read() as s:
            for row in s.connection().execute(query):
                _, rows = found.setdefault(row.service_id, (bool(row.has_secret), []))
                if row.kind is not None:
                    rows.append(_credential(row))
        return {sid: ServiceCredentials.of(sid, has, rows) for sid, (has, rows) in found.items()}

    def update_service_credentials(
        self,
        service_id: str,
        add: Sequence[CredentialRecord],
        remove: Sequence[CredentialRecord],
        now: datetime,
        *,
        audit: Callable[[ServiceRecord, ServiceCredentials], AuditEvent] | None = None,
    ) -> ServiceCredentials:
        """Remove, then add, credentials of a service in one transaction; returns them all.
        `audit(service, credentials)` (both as they are after the change) gives its audit row,
        written in the same transaction.

        A public key or SAN is removed by its (kind, ref) alone, so `remove` may name a key by
        its id; removing and adding one key id replaces its key. Removing a service's last way
        to log in is allowed here (the use case decides). Writes a 'service' change, unless
        both lists are empty.

        Raises:
            NotFound: no such service.
            FailedPrecondition: removing a credential the service does not have, or binding a
                subject of a trust that does not exist.
            AlreadyExists: adding a credential the service has, or a federated subject bound
                to another service.
            InvalidArgument: a credential given twice in one list.
        """
        now = _utc_in(now)
        add, remove = tuple(add), tuple(remove)
        _check_credentials(add)
        _check_credentials(remove)
        table = cast(Table, ServiceCredentialRow.__table__)
        try:
            with self._write() as s:
                # Updates of one service queue on its row (PostgreSQL; SQLite has one writer).
                row = s.get(ServiceRow, service_id, with_for_update=True)
                if row is None:
                    raise NotFound(f"service {service_id!r} not found")
                held = {
                    _identity(_credential(r)): r.id
                    for r in s.execute(
                        select(table.c.id, table.c.kind, table.c.ref, table.c.value).where(
                            table.c.service_id == service_id
                        )
                    )
                }
                gone: list[int] = []
                for c in remove:
                    found = held.pop(_identity(c), None)
                    if found is None:
                        raise FailedPrecondition(f"service {service_id!r} has no {_describe(c)}")
                    gone.append(found)
                for c in add:
                    if _identity(c) in held:
                        raise AlreadyExists(f"service {service_id!r} already has {_describe(c)}")
                if add or remove:
                    if gone:
                        # Before the inserts (Core statements run in order), so a replaced key
                        # id never meets itself in the unique index.
                        s.execute(delete(table).where(table.c.id.in_(gone)))
                    self._bind_credentials(s, service_id, add, now)
                    row.updated_at = now
                    s.flush()
                    self._add_change(s, "service", service_id, now)
                after = self._service_credentials(s, service_id)
                self._add_audit(s, None if audit is None else audit(_service(row), after))
                return after
        except sa_exc.IntegrityError:
            raise self._conflict(service_id, add, creating=False) from None

    def fetch_federated_binding(self, trust: str, subject: str) -> str | None:
        """The service a federated (trust, subject) is bound to, if any."""
        with self._read() as s:
            return self._bound_to(s, trust, subject)

    # -- trusted issuers (issue 14) -----------------------------------------------------------

    def _trust_taken(self, s: Session, record: TrustRecord) -> AlreadyExists | None:
        if s.get(TrustedIssuerRow, record.name) is not None:
            return AlreadyExists(f"trust {record.name!r} already exists")
        other = s.scalar(
            select(TrustedIssuerRow.name).where(TrustedIssuerRow.issuer == record.issuer)
        )
        if other is not None:
            return AlreadyExists(f"issuer {record.issuer!r} is already trusted as {other!r}")
        return None

    def create_trust(
        self, record: TrustRecord, now: datetime, *, audit: AuditEvent | None = None
    ) -> TrustRecord:
        """Store a trusted issuer (its created_at is `now`); writes a 'trust' change and the
        `audit` row, in one transaction.

        Raises:
            AlreadyExists: the name is taken, or the issuer is trusted under another name.
            ValueError: not exactly one of jwks_json and jwks_url (a caller's bug).
        """
        if (record.jwks_json is None) == (record.jwks_url is None):
            raise ValueError("exactly one of jwks_json and jwks_url is required")
        now = _utc_in(now)
        try:
            with self._write() as s:
                taken = self._trust_taken(s, record)
                if taken is not None:
                    raise taken
                row = TrustedIssuerRow(
                    name=record.name,
                    issuer=record.issuer,
                    audience=record.audience,
                    jwks_json=record.jwks_json,
                    jwks_url=record.jwks_url,
                    max_lifetime_seconds=record.max_lifetime_seconds,
                    created_at=now,
                    updated_at=now,
                )
                s.add(row)
                s.flush()
                self._add_change(s, "trust", record.name, now)
                self._add_audit(s, audit)
                return _trust(row)
        except sa_exc.IntegrityError:
            # Another replica added the name or the issuer meanwhile.
            with self._read() as s:
                taken = self._trust_taken(s, record)
            raise (taken or AlreadyExists(f"trust {record.name!r} already exists")) from None

    def list_trusts(self) -> list[TrustRecord]:
        with self._read() as s:
            rows = s.scalars(select(TrustedIssuerRow).order_by(TrustedIssuerRow.name))
            return [_trust(r) for r in rows]

    def fetch_trust(self, name: str) -> TrustRecord | None:
        with self._read() as s:
            row = s.get(TrustedIssuerRow, name)
            return None if row is None else _trust(row)

    def delete_trust(
        self,
        name: str,
        now: datetime,
        *,
        audit: Callable[[int], AuditEvent] | None = None,
    ) -> int:
        """Delete a trust and every federated subject bound to it; returns how many bindings.

        The bindings go with it, so a later trust of the same name (perhaps another issuer)
        inherits none of them. Writes a 'trust' change, and a 'service' change for each service
        that lost a binding. `audit(unbound)` (how many bindings went) gives the removal's
        audit row, written in the same transaction.

        Raises:
            NotFound: no such trust.
        """
        now = _utc_in(now)
        table = cast(Table, ServiceCredentialRow.__table__)
        with self._write() as s:
            # Locked first: bindings being made now (FOR SHARE on it) commit before this goes
            # on, and the delete below, a new statement, sees them.
            row = s.get(TrustedIssuerRow, name, with_for_update=True)
            if row is None:
                raise NotFound(f"trust {name!r} not found")
            unbound = list(
                s.execute(
                    delete(table)
                    .where(table.c.kind == "federated", table.c.ref == name)
                    .returning(table.c.service_id)
                ).scalars()
            )
            services = sorted(set(unbound))
            s.delete(row)
            if services:
                s.execute(
                    update(ServiceRow)
                    .where(ServiceRow.service_id.in_(services))
                    .values(updated_at=now)
                )
            s.flush()
            self._add_change(s, "trust", name, now)
            for service_id in services:
                self._add_change(s, "service", service_id, now)
            self._add_audit(s, None if audit is None else audit(len(unbound)))
            return len(unbound)

    # -- service secrets ----------------------------------------------------------------------

    def end_secret_graces(self, now: datetime) -> int:
        """Delete previous secrets whose grace period has ended; returns how many.

        The end is then a state, not a comparison with the clock: a later step back of the
        clock cannot revive the secret. Reads first, so that the usual call (nothing ended)
        takes no write lock.
        """
        now = _utc_in(now)
        ended = (ServiceSecretRow.slot == "previous") & (ServiceSecretRow.expires_at <= now)
        with self._read() as s:
            if s.scalar(select(ServiceSecretRow.service_id).where(ended).limit(1)) is None:
                return 0
        with self._write() as s:
            result = s.execute(delete(ServiceSecretRow).where(ended))
            return _rowcount(result)

    def update_service_secret(
        self,
        service_id: str,
        new_hash: bytes,
        now: datetime,
        previous_expires_at: datetime | None,
        *,
        expected_current_hash: bytes | None = None,
        audit: AuditEvent | None = None,
    ) -> SecretRecord | None:
        """Install a new current secret; the old one stays valid until `previous_expires_at`.

        At most one previous secret exists: an older one is dropped. Returns the new previous
        secret, or None when the old secret ends now. A self-rotation passes the hash it
        authenticated with as `expected_current_hash`: checked again inside this transaction,
        so a rotation that committed since the login cannot be undone by a secret it demoted.
        `audit` is written in the same transaction: should it fail, nothing is rotated, and the
        caller (who never saw the new secret) still holds a secret that works.

        Raises:
            NotFound: no such service.
            FailedPrecondition: the current secret is no longer `expected_current_hash`.
        """
        now = _utc_in(now)
        previous_until = _opt_in(previous_expires_at)
        with self._write() as s:
            # Rotations of one service queue on its row (PostgreSQL; SQLite has one writer), so
            # each one reads the secrets the one before it committed.
            if s.get(ServiceRow, service_id, with_for_update=True) is None:
                raise NotFound(f"service {service_id!r} not found")
            mine = ServiceSecretRow.service_id == service_id
            if expected_current_hash is not None:
                stored = s.scalar(
                    select(ServiceSecretRow.secret_hash).where(
                        mine, ServiceSecretRow.slot == "current"
                    )
                )
                if stored is None or not hmac.compare_digest(stored, expected_current_hash):
                    raise FailedPrecondition("the current secret has changed")
            s.execute(delete(ServiceSecretRow).where(mine, ServiceSecretRow.slot == "previous"))
            current = ServiceSecretRow.slot == "current"
            previous: SecretRecord | None = None
            if previous_until is not None and previous_until > now:
                s.execute(
                    update(ServiceSecretRow)
                    .where(mine, current)
                    .values(slot="previous", expires_at=previous_until)
                )
                row = s.scalars(
                    select(ServiceSecretRow)
                    .where(mine, ServiceSecretRow.slot == "previous")
                    .execution_options(populate_existing=True)
                ).first()
                previous = None if row is None else _secret(row)
            else:
                s.execute(delete(ServiceSecretRow).where(mine, current))
            s.add(
                ServiceSecretRow(
                    service_id=service_id,
                    slot="current",
                    secret_hash=new_hash,
                    created_at=now,
                    expires_at=None,
                )
            )
            self._add_audit(s, audit)
            return previous

    # -- signing keys -------------------------------------------------------------------------

    def create_signing_key(
        self,
        record: SigningKeyRecord,
        now: datetime,
        *,
        expected_active_kid: str | None,
        publish_until: datetime,
        revoke_others: bool = False,
        audit: AuditEvent | None = None,
    ) -> bool:
        """Activate `record` if the active key is still `expected_active_kid` (None: no key).

        The caller generates the key outside the transaction; the check happens again inside
        it, serialized across processes (Dex rotation). False means another rotation won the
        race, which is a normal outcome. The old active key is retired (public part published
        until `publish_until`); with `revoke_others` every other key is revoked at once. The
        `audit` row is written in the same transaction, and only when this one activates.

        Raises:
            AlreadyExists: a key with this kid exists.
            KekChanged: `record.kek_id` is not the KEK the database wraps under any more (an
                `authsvc kek rotate` committed since the key was wrapped).
        """
        now = _utc_in(now)
        publish_until = _utc_in(publish_until)
        try:
            with self._write() as s:
                self._advisory_lock(s, _LOCK_ROTATION)
                active_kid = s.scalar(
                    select(SigningKeyRow.kid).where(SigningKeyRow.state == "active")
                )
                if active_kid != expected_active_kid:
                    return False
                self._check_wrapping(s, record)
                if active_kid is not None:
                    self._retire(s, active_kid, now, publish_until)
                if revoke_others:
                    s.execute(
                        update(SigningKeyRow)
                        .where(SigningKeyRow.state != "revoked", SigningKeyRow.kid != record.kid)
                        .values(
                            state="revoked", publish_until=now, private_key_enc=None, kek_id=None
                        )
                    )
                s.add(
                    _new_key_row(
                        record,
                        "active",
                        created_at=_utc_in(record.created_at),
                        activated_at=now,
                        publish_until=_opt_in(record.publish_until),
                    )
                )
                s.flush()
                self._add_change(s, "key", record.kid, now)
                self._add_audit(s, audit)
                return True
        except sa_exc.IntegrityError:
            raise AlreadyExists(f"signing key {record.kid!r} already exists") from None

    def create_next_signing_key(self, record: SigningKeyRecord, now: datetime) -> bool:
        """Store `record` as the `next` key, published from `now` on, unless one exists.

        One `next` key at a time, whoever races (the check runs under the rotation lock):
        False means another replica's key is the next one, and this one is dropped unused.
        Its `created_at` is `now`, the moment it enters the JWK Set, which is what the
        publish lead is measured from.

        Raises:
            AlreadyExists: a key with this kid exists.
            KekChanged: `record.kek_id` is not the KEK the database wraps under any more.
        """
        now = _utc_in(now)
        try:
            with self._write() as s:
                self._advisory_lock(s, _LOCK_ROTATION)
                if s.scalar(select(SigningKeyRow.kid).where(SigningKeyRow.state == "next")):
                    return False
                self._check_wrapping(s, record)
                s.add(_new_key_row(record, "next", created_at=now))
                s.flush()
                self._add_change(s, "key", record.kid, now)
                return True
        except sa_exc.IntegrityError:
            raise AlreadyExists(f"signing key {record.kid!r} already exists") from None

    def activate_next_signing_key(
        self,
        kid: str,
        now: datetime,
        *,
        expected_active_kid: str | None,
        publish_until: datetime,
        audit: AuditEvent | None = None,
    ) -> NextActivation:
        """Make the `next` key `kid` active if the active key is still `expected_active_kid`.

        The same race rule as create_signing_key: the check runs again inside the transaction,
        serialized across processes, so replicas rotating at once activate one key between
        them and the others get "already_rotated". The old active key is retired (published
        until `publish_until`). "no_next": `kid` is not a `next` key (any more). The `audit`
        row is written in the same transaction, and only when it is "activated".
        """
        now = _utc_in(now)
        publish_until = _utc_in(publish_until)
        with self._write() as s:
            self._advisory_lock(s, _LOCK_ROTATION)
            active_kid = s.scalar(select(SigningKeyRow.kid).where(SigningKeyRow.state == "active"))
            if active_kid != expected_active_kid:
                return "already_rotated"
            row = s.get(SigningKeyRow, kid)
            if row is None or row.state != "next":
                return "no_next"
            if active_kid is not None:
                self._retire(s, active_kid, now, publish_until)
                # Flushed first: the one-active index must never see two active rows.
                s.flush()
            row.state = "active"
            row.activated_at = now
            s.flush()
            self._add_change(s, "key", kid, now)
            self._add_audit(s, audit)
            return "activated"

    def _check_wrapping(self, s: Session, record: SigningKeyRecord) -> None:
        wrapping = s.scalar(
            select(WrappedKeyRow.kek_id).where(WrappedKeyRow.name == SECRET_HASH_KEY)
        )
        if record.kek_id is not None and wrapping not in (None, record.kek_id):
            raise KekChanged("the key-encryption key changed during the rotation")

    def _retire(self, s: Session, kid: str, now: datetime, publish_until: datetime) -> None:
        s.execute(
            update(SigningKeyRow)
            .where(SigningKeyRow.kid == kid)
            .values(
                state="retired",
                retired_at=now,
                publish_until=publish_until,
                private_key_enc=None,
                kek_id=None,
            )
        )

    def fetch_active_signing_key(self) -> SigningKeyRecord | None:
        with self._read() as s:
            row = s.scalars(select(SigningKeyRow).where(SigningKeyRow.state == "active")).first()
            return None if row is None else _key(row)

    def list_signing_keys(self) -> list[SigningKeyRecord]:
        """Every key in every state, newest first."""
        with self._read() as s:
            rows = s.scalars(
                select(SigningKeyRow).order_by(
                    SigningKeyRow.created_at.desc(), SigningKeyRow.kid.desc()
                )
            )
            return [_key(r) for r in rows]

    def prune_signing_keys(self, now: datetime) -> int:
        """Delete retired and revoked keys no longer published; returns how many."""
        now = _utc_in(now)
        with self._write() as s:
            kids = list(
                s.scalars(
                    select(SigningKeyRow.kid).where(
                        SigningKeyRow.state.in_(("retired", "revoked")),
                        SigningKeyRow.publish_until <= now,
                    )
                )
            )
            if kids:
                s.execute(delete(SigningKeyRow).where(SigningKeyRow.kid.in_(kids)))
                for kid in kids:
                    self._add_change(s, "key", kid, now)
            return len(kids)

    # -- KEK-wrapped key material --------------------------------------------------------------

    def fetch_wrapped_key(self, name: str) -> WrappedKeyRecord | None:
        with self._read() as s:
            row = s.get(WrappedKeyRow, name)
            return None if row is None else _wrapped(row)

    def fetch_wrapping_kek_id(self) -> str | None:
        """The KEK new data is wrapped under: the one wrapping the secret-hash key (which
        `authsvc kek rotate` re-wraps last, in the same transaction as everything else)."""
        with self._read() as s:
            return s.scalar(
                select(WrappedKeyRow.kek_id).where(WrappedKeyRow.name == SECRET_HASH_KEY)
            )

    def create_wrapped_key(
        self, name: str, kek_id: str, wrapped: bytes, now: datetime
    ) -> WrappedKeyRecord:
        """Store `wrapped` under `name` unless a row exists; returns the row that is stored
        (another process's, when it won the race)."""
        now = _utc_in(now)
        table = cast(Table, WrappedKeyRow.__table__)
        dialect_insert = postgresql.insert if self._postgres else sqlite.insert
        with self._write() as s:
            s.execute(
                dialect_insert(table)
                .values(name=name, kek_id=kek_id, wrapped=wrapped, updated_at=now)
                .on_conflict_do_nothing(index_elements=[table.c.name])
            )
            row = s.get(WrappedKeyRow, name, populate_existing=True)
            if row is None:  # pragma: no cover - inserted or already there
                raise RuntimeError("wrapped key missing after insert")
            return _wrapped(row)

    def rewrap_keys(
        self,
        signing: Callable[[SigningKeyRecord], tuple[str, bytes] | None],
        named: Callable[[WrappedKeyRecord], tuple[str, bytes] | None],
        now: datetime,
        *,
        audit: Callable[[int], AuditEvent] | None = None,
    ) -> int:
        """Re-wrap every stored private key and wrapped key in one transaction.

        Each callback gets a stored item and returns its new (kek_id, blob), or None to leave
        it. An exception from a callback rolls everything back: the rotation is all or nothing,
        a kill -9 at any moment leaves either the old wrapping or the new one. Serialized with
        signing-key rotations, so no key is wrapped under the old KEK after this commits.
        Returns how many items changed; `audit(changed)` gives the audit row, written in the
        same transaction (so a failed audit write re-wraps nothing).
        """
        now = _utc_in(now)
        changed = 0
        with self._write() as s:
            self._advisory_lock(s, _LOCK_ROTATION)
            keys = list(
                s.scalars(
                    select(SigningKeyRow)
                    .where(SigningKeyRow.private_key_enc.is_not(None))
                    .order_by(SigningKeyRow.kid)
                )
            )
            rewrapped = []
            for row in keys:
                new = signing(_key(row))
                if new is not None:
                    row.kek_id, row.private_key_enc = new
                    rewrapped.append(row.kid)
            s.flush()
            for kid in rewrapped:
                self._add_change(s, "key", kid, now)
            changed += len(rewrapped)
            for wrapped_row in s.scalars(select(WrappedKeyRow).order_by(WrappedKeyRow.name)):
                new = named(_wrapped(wrapped_row))
                if new is not None:
                    wrapped_row.kek_id, wrapped_row.wrapped = new
                    wrapped_row.updated_at = now
                    changed += 1
            s.flush()
            self._add_audit(s, None if audit is None else audit(changed))
        return changed

    # -- revocations --------------------------------------------------------------------------

    def create_revocation(
        self,
        *,
        jti: str | None,
        service_id: str | None,
        revoked_before: datetime | None,
        expires_at: datetime,
        reason: str,
        now: datetime,
        kind: RevocationKind | None = None,
        audit: AuditEvent | None = None,
    ) -> RevocationRecord | None:
        """Revoke one token (`jti`) or a service's tokens issued before `revoked_before`, with
        the `audit` row, in one transaction.

        `kind` defaults to what the target implies ("token" or "service_tokens"); disabling a
        service passes "service_disabled".
        Returns None when that jti is already revoked (the `audit` row is written all the same:
        the revocation the caller asked for is in force).

        Raises:
            ValueError: not exactly one of `jti` and `service_id` given, or a kind that does
                not fit the target.
        """
        if (jti is None) == (service_id is None):
            raise ValueError("exactly one of jti and service_id is required")
        if kind is None:
            kind = "token" if jti is not None else "service_tokens"
        if (kind == "token") != (jti is not None):
            raise ValueError("kind 'token' goes with jti, the service kinds with service_id")
        now = _utc_in(now)
        with self._write() as s:
            record = self._add_revocation(
                s,
                jti=jti,
                service_id=service_id,
                revoked_before=revoked_before,
                expires_at=expires_at,
                reason=reason,
                now=now,
                kind=kind,
            )
            self._add_audit(s, audit)
            return record

    def _add_revocation(
        self,
        s: Session,
        *,
        jti: str | None,
        service_id: str | None,
        revoked_before: datetime | None,
        expires_at: datetime,
        reason: str,
        now: datetime,
        kind: RevocationKind,
    ) -> RevocationRecord | None:
        """create_revocation's row, in the caller's transaction (None: that jti is revoked)."""
        # Serialized so rows commit in cursor order (followers read "cursor > N").
        self._advisory_lock(s, _LOCK_REVOCATIONS)
        if (
            jti is not None
            and s.scalar(select(RevocationRow.cursor).where(RevocationRow.jti == jti)) is not None
        ):
            return None
        row = RevocationRow(
            jti=jti,
            service_id=service_id,
            revoked_before=_opt_in(revoked_before),
            expires_at=_utc_in(expires_at),
            reason=reason,
            created_at=_utc_in(now),
            kind=kind,
        )
        s.add(row)
        s.flush()
        return _revocation(row)

    def list_revocations(
        self, after_cursor: int, now: datetime, limit: int = 10000
    ) -> list[RevocationRecord]:
        """Revocations still in force with a cursor above `after_cursor`, in cursor order."""
        now = _utc_in(now)
        table = cast(Table, RevocationRow.__table__)
        with self._read() as s:
            # Core rows, not ORM objects: a replica starting beside a million revocations
            # reads them all through here, and the ORM's per-object cost would dominate.
            rows = s.connection().execute(
                select(table)
                .where(table.c.cursor > after_cursor, table.c.expires_at > now)
                .order_by(table.c.cursor)
                .limit(limit)
            )
            return [_revocation(r) for r in rows]

    def list_held_revocations(
        self, after_cursor: int, now: datetime, limit: int = 10000
    ) -> list[HeldRevocation]:
        """list_revocations, cut to what a replica holds in memory (whole epoch seconds)."""
        now = _utc_in(now)
        t = cast(Table, RevocationRow.__table__).c
        query = (
            select(
                t.cursor,
                t.jti,
                t.service_id,
                # Whole seconds computed by the database: STRFTIME('%s') on SQLite, EXTRACT on
                # PostgreSQL (truncated below), instead of a datetime built per row here.
                func.extract("epoch", t.revoked_before),
                func.extract("epoch", t.expires_at),
                t.kind,
            )
            .where(t.cursor > after_cursor, t.expires_at > now)
            .order_by(t.cursor)
            .limit(limit)
        )
        with self._read() as s:
            return [
                HeldRevocation(
                    cursor,
                    jti,
                    service_id,
                    None if before is None else int(before),
                    int(expires),
                    kind,
                )
                for cursor, jti, service_id, before, expires, kind in s.connection()
                .execute(query)
                .all()
            ]

    def fetch_latest_revocation_cursor(self) -> int:
        with self._read() as s:
            return s.scalar(select(func.max(RevocationRow.cursor))) or 0

    def prune_revocations(self, now: datetime) -> int:
        """Delete revocations whose tokens have all expired; returns how many."""
        now = _utc_in(now)
        with self._write() as s:
            result = s.execute(delete(RevocationRow).where(RevocationRow.expires_at <= now))
            return _rowcount(result)

    def prune_used_assertions(self, now: datetime) -> int:
        """Forget assertion jtis whose assertions have expired (they verify no more, so
        cannot be replayed); returns how many."""
        now = _utc_in(now)
        with self._write() as s:
            result = s.execute(delete(UsedAssertionRow).where(UsedAssertionRow.expires_at <= now))
            return _rowcount(result)

    # -- changes ------------------------------------------------------------------------------

    def list_changes(self, after_cursor: int, limit: int = 1000) -> list[ChangeRecord]:
        with self._read() as s:
            rows = s.scalars(
                select(ChangeRow)
                .where(ChangeRow.cursor > after_cursor)
                .order_by(ChangeRow.cursor)
                .limit(limit)
            )
            return [_change(r) for r in rows]

    def fetch_latest_change_cursor(self) -> int:
        with self._read() as s:
            return s.scalar(select(func.max(ChangeRow.cursor))) or 0

    # -- audit --------------------------------------------------------------------------------

    def create_audit_event(
        self,
        *,
        at: datetime,
        actor: str,
        action: str,
        target: str,
        outcome: str,
        peer: str,
        request_id: str,
        detail: str = "",
    ) -> None:
        """An audit row on its own: of a refusal, or of a change made elsewhere. A change this
        repository writes takes its row as its `audit` argument instead (AuditEvent)."""
        event = AuditEvent(
            at=_utc_in(at),
            actor=actor,
            action=action,
            target=target,
            outcome=outcome,
            peer=peer,
            request_id=request_id,
            detail=detail,
        )
        with self._write() as s:
            self._add_audit(s, event)

    def list_audit_events(
        self, *, limit: int = 100, before_id: int | None = None
    ) -> list[AuditRecord]:
        """Newest first; pass the last id seen as `before_id` for the next page."""
        with self._read() as s:
            query = select(AuditEventRow).order_by(AuditEventRow.id.desc()).limit(limit)
            if before_id is not None:
                query = query.where(AuditEventRow.id < before_id)
            return [_audit(r) for r in s.scalars(query)]

    def prune_audit_events(self, before: datetime) -> int:
        """Delete audit events older than `before`; returns how many."""
        before = _utc_in(before)
        with self._write() as s:
            result = s.execute(delete(AuditEventRow).where(AuditEventRow.at < before))
            return _rowcount(result)

    # -- authentication failures (throttling) -------------------------------------------------

    def prune_known_peers(self, before: datetime) -> int:
        """Forget peers whose last success is older than `before`; returns how many."""
        before = _utc_in(before)
        with self._write() as s:
            result = s.execute(delete(KnownPeerRow).where(KnownPeerRow.last_success_at < before))
            return _rowcount(result)

    def prune_auth_failures(self, before: datetime) -> int:
        """Delete counters whose last failure is older than `before`; returns how many."""
        before = _utc_in(before)
        with self._write() as s:
            result = s.execute(
                delete(AuthFailureRow).where(AuthFailureRow.last_failure_at < before)
            )
            return _rowcount(result)

    # -- logins (the login batch's unit of work) ---------------------------------------------

    @contextmanager
    def login_batch(self, now: datetime, window_seconds: int) -> Iterator[LoginBatch]:
        """One write transaction settling a batch of logins (authsvc.usecases.login_batch).

        Everything a login is decided on (the service, its live secrets, the failure counters,
        known peers) is read inside the same transaction that records the outcome, so a batch
        is exactly as consistent as one login per transaction was, at one commit per batch.
        It runs on a plain connection with statements compiled once (_LoginStatements) and
        executed on the transaction's own DBAPI cursor (_Compiled): this is the IssueToken
        path, where building statements and ORM sessions per call, and then SQLAlchemy's
        execution around each statement, would be most of the transaction's cost.
        """
        with _storage_errors(), write_lock(self.engine), self.engine.begin() as conn:
            batch = LoginBatch(conn, self._login_sql, _utc_in(now), window_seconds)
            try:
                yield batch
                batch.flush()
            finally:
                batch.close()


class _LoginStatements:
    """The login batch's statements, built and compiled once per repository (the dialect
    fixes the upserts and the SQL text); LoginBatch runs them by name from `compiled`."""

    def __init__(self, dialect: Dialect) -> None:
        postgres = dialect.name == "postgresql"
        services = cast(Table, ServiceRow.__table__)
        secrets = cast(Table, ServiceSecretRow.__table__)
        failures = cast(Table, AuthFailureRow.__table__)
        peers = cast(Table, KnownPeerRow.__table__)
        dialect_insert = postgresql.insert if postgres else sqlite.insert
        # A service with its live secrets (current and, within its grace period, previous):
        # one row per secret, or one row with a NULL hash when it has none.
        live = (secrets.c.service_id == services.c.service_id) & (
            (secrets.c.slot == "current") | (secrets.c.expires_at > bindparam("now"))
        )
        self.credentials = (
            select(services, secrets.c.slot, secrets.c.secret_hash)
            .select_from(services.outerjoin(secrets, live))
            .where(services.c.service_id == bindparam("service_id"))
            .order_by(secrets.c.slot)
        )
        # The two counters of one login (its id's and its peer's) in one statement.
        self.failures = select(failures.c.key, failures.c.count).where(
            failures.c.key.in_([bindparam("id_key"), bindparam("peer_key")]),
            failures.c.window_start > bindparam("cutoff"),
        )
        # One more failure; a window that started at or before `cutoff` restarts at 1. One
        # atomic upsert, so replicas counting at once never lose an increment.
        count = dialect_insert(failures).values(
            key=bindparam("key"),
            count=1,
            window_start=bindparam("now"),
            last_failure_at=bindparam("now"),
        )
        expired = failures.c.window_start <= bindparam("cutoff")
        self.count_failure = count.on_conflict_do_update(
            index_elements=[failures.c.key],
            set_={
                "count": case((expired, 1), else_=failures.c.count + 1),
                "window_start": case(
                    (expired, count.excluded.window_start), else_=failures.c.window_start
                ),
                "last_failure_at": count.excluded.last_failure_at,
            },
        )
        self.reset_failures = delete(failures).where(failures.c.key == bindparam("key"))
        self.known_peer = select(peers.c.last_success_at).where(
            peers.c.service_id == bindparam("service_id"), peers.c.peer == bindparam("peer")
        )
        remember = dialect_insert(peers).values(
            service_id=bindparam("service_id"),
            peer=bindparam("peer"),
            last_success_at=bindparam("now"),
        )
        self.remember_peer = remember.on_conflict_do_update(
            index_elements=[peers.c.service_id, peers.c.peer],
            set_={"last_success_at": remember.excluded.last_success_at},
        )
        # Workload identity (issue 14): a service's registered credentials, the service a
        # federated subject is bound to, and a jti's first use.
        creds = cast(Table, ServiceCredentialRow.__table__)
        self.workload = (
            select(creds.c.kind, creds.c.ref, creds.c.value)
            .where(creds.c.service_id == bindparam("service_id"))
            .order_by(creds.c.id)
        )
        self.federated_binding = select(creds.c.service_id).where(
            creds.c.kind == "federated",
            creds.c.ref == bindparam("trust"),
            creds.c.value == bindparam("subject"),
        )
        used = cast(Table, UsedAssertionRow.__table__)
        use = dialect_insert(used).values(
            service_id=bindparam("service_id"),
            jti=bindparam("jti"),
            expires_at=bindparam("expires_at"),
        )
        # A row whose assertion has expired is taken over (its jti may be used again: the
        # assertion that carried it verifies no more); a live one is left, and counts 0 rows.
        self.use_assertion = use.on_conflict_do_update(
            index_elements=[used.c.service_id, used.c.jti],
            set_={"expires_at": use.excluded.expires_at},
            where=used.c.expires_at <= bindparam("now"),
        ).execution_options(preserve_rowcount=True)  # an INSERT's count is dropped otherwise
        audit = cast(Table, AuditEventRow.__table__)
        self.audit = insert(audit)
        # One more batch of attempts on an aggregated row: the first batch inserts it (its
        # time is the row's first_at), later ones add to its count and move its `at`.
        aggregate = dialect_insert(audit).values(
            at=bindparam("at"),
            first_at=bindparam("at"),
            actor=bindparam("actor"),
            action=bindparam("action"),
            target=bindparam("target"),
            outcome=bindparam("outcome"),
            peer=bindparam("peer"),
            request_id=bindparam("request_id"),
            detail=bindparam("detail"),
            count=bindparam("count"),
            aggregate_key=bindparam("aggregate_key"),
        )
        self.aggregate = aggregate.on_conflict_do_update(
            index_elements=[audit.c.aggregate_key],
            set_={"count": audit.c.count + aggregate.excluded.count, "at": aggregate.excluded.at},
        ).returning(audit.c.count)
        # Each statement above, compiled once for the dialect (the INSERT of audit rows with
        # exactly the columns a row of LoginBatch.audit carries).
        self.compiled = {
            name: _Compiled(statement, dialect, _AUDIT_COLUMNS if name == "audit" else None)
            for name, statement in vars(self).items()
        }


# Row types are made from the statements' columns at run time, where typing cannot follow.
_row_type: Callable[..., Any] = namedtuple
# The columns of an audit row as LoginBatch.audit writes them.
_AUDIT_COLUMNS = ("at", "actor", "action", "target", "outcome", "peer", "request_id", "detail")


class _Compiled:
    """One login-batch statement, compiled once for the engine's dialect and run on the
    transaction's DBAPI cursor.

    The login batch is IssueToken's path, and there SQLAlchemy's work around each execution
    (its execution context, result set-up, per-row processing) cost several times what the
    database itself did: in a tight loop on SQLite, a service read took 59 µs through
    Connection.execute and 10 µs on the cursor (BENCHMARKS, issue 16's fifth round). So what
    SQLAlchemy adds is worked out here once per statement: the SQL text and the order of its
    parameters from SQLAlchemy's compiler for this dialect, the values of its literal
    parameters, and the bind and result processors of each parameter's and column's type for
    this dialect (SQLite's datetimes and booleans). A driver error is raised as SQLAlchemy
    raises it, the connection invalidated on a disconnect, so `_storage_errors` judges both
    paths alike.
    """

    __slots__ = ("_binders", "_literals", "_names", "_positional", "_readers", "_row", "sql")

    def __init__(
        self, statement: ClauseElement, dialect: Dialect, column_keys: Sequence[str] | None = None
    ) -> None:
        compiled = cast(
            SQLCompiler,
            statement.compile(
                dialect=dialect, column_keys=list(column_keys) if column_keys else None
            ),
        )
        self.sql = compiled.string
        binds = compiled.binds
        self._positional = bool(compiled.positional)
        # Positional styles (SQLite's qmark) name a parameter once per use, in order; named
        # ones (psycopg's pyformat) once.
        self._names: tuple[str, ...] = tuple(
            compiled.positiontup or () if self._positional else binds
        )
        self._literals = {
            name: bind.effective_value for name, bind in binds.items() if not bind.required
        }
        self._binders = {
            name: processor
            for name, bind in binds.items()
            if (processor := bind.type.dialect_impl(dialect).bind_processor(dialect)) is not None
        }
        columns = list(getattr(statement, "exported_columns", ()))
        self._row: Any = _row_type("_Row", [c.key for c in columns], rename=True)
        readers = tuple(
            c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns
        )
        # None when no column needs one, so rows() can pass the driver's values as they come.
        self._readers = readers if any(readers) else None

    def parameters(self, values: Mapping[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        """The driver's parameters for one execution with `values` (the named parameters)."""
        literals, binders = self._literals, self._binders
        bound: dict[str, Any] = {}
        for name in self._names:
            if name not in bound:
                value = values[name] if name in values else literals[name]
                binder = binders.get(name)
                bound[name] = value if binder is None else binder(value)
        if self._positional:
            return tuple(bound[name] for name in self._names)
        return bound

    def rows(self, cursor: Any) -> list[Any]:
        """The cursor's remaining rows, each a named tuple of processed values."""
        make, readers = self._row._make, self._readers
        if readers is None:
            return [make(raw) for raw in cursor.fetchall()]
        return [
            make(
                value if read is None else read(value)
                for read, value in zip(readers, raw, strict=True)
            )
            for raw in cursor.fetchall()
        ]


class LoginBatch:
    """Reads and writes of one login-batch transaction; see Repository.login_batch.

    Each service and failure counter is read once per batch and then kept up to date here as
    the batch's own logins count failures and reset them, so a later login in the batch sees
    the earlier ones exactly as it would have in a transaction of its own.
    """

    def __init__(
        self, conn: Connection, sql: _LoginStatements, now: datetime, window_seconds: int
    ) -> None:
        self._c = conn
        self._sql = sql.compiled
        self._cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        self.now = now
        self._cutoff = now - timedelta(seconds=window_seconds)
        self._services: dict[str, tuple[ServiceRecord | None, tuple[_Secret, ...]]] = {}
        self._workload: dict[str, ServiceCredentials | None] = {}
        self._failures: dict[str, int] = {}
        self._peers_remembered: set[tuple[str, str]] = set()
        self._audit: list[dict[str, object]] = []
        self._aggregates: dict[str, dict[str, object]] = {}
        # Aggregate keys whose row this batch's commit created (rather than added to).
        self.created_aggregates: set[str] = set()

    def _execute(
        self, name: str, values: Mapping[str, Any] | list[dict[str, object]], *, rows: bool = False
    ) -> Any:
        """Run login statement `name` on the transaction's cursor, with `values` or once per
        mapping of a list; returns the cursor, or with `rows` its rows (fetching can fail
        too: SQLite steps through the rows as they are fetched)."""
        statement = self._sql[name]
        cursor = self._cursor
        try:
            if isinstance(values, list):
                many = [statement.parameters(v) for v in values]
                cursor.executemany(statement.sql, cast(Any, many))  # one paramstyle per dialect
            else:
                cursor.execute(statement.sql, statement.parameters(values))
            return statement.rows(cursor) if rows else cursor
        except self._c.dialect.loaded_dbapi.Error as exc:
            raise self._driver_error(exc) from exc

    def _rows(self, name: str, values: Mapping[str, Any]) -> list[Any]:
        return cast(list[Any], self._execute(name, values, rows=True))

    def _scalar(self, name: str, values: Mapping[str, Any]) -> Any:
        rows = self._rows(name, values)
        return rows[0][0] if rows else None

    def _driver_error(self, exc: Exception) -> sa_exc.DBAPIError:
        """`exc` as SQLAlchemy would have raised it (the parameters left out), invalidating
        the connection first when the dialect calls it a disconnect."""
        conn, dialect = self._c, self._c.dialect
        invalidated = dialect.is_disconnect(
            cast(Any, exc), conn.connection.dbapi_connection, self._cursor
        )
        if invalidated:
            conn.invalidate(exc)
        return cast(
            sa_exc.DBAPIError,
            sa_exc.DBAPIError.instance(
                None,
                None,
                exc,
                dialect.loaded_dbapi.Error,
                hide_parameters=True,
                connection_invalidated=invalidated,
                dialect=dialect,
            ),
        )

    def close(self) -> None:
        # Called on the way out of the transaction, whatever ended it: a cursor whose
        # connection is already gone has nothing left to free, and the error that ended the
        # transaction is the one to raise.
        with suppress(Exception):
            self._cursor.close()

    def _credentials(self, service_id: str) -> tuple[ServiceRecord | None, tuple[_Secret, ...]]:
        found = self._services.get(service_id)
        if found is None:
            rows = self._rows("credentials", {"service_id": service_id, "now": self.now})
            if not rows:
                found = (None, ())
            else:
                secrets = tuple(
                    (cast(SecretSlot, r.slot), r.secret_hash)
                    for r in rows
                    if r.secret_hash is not None
                )
                found = (_service(rows[0]), secrets)
            self._services[service_id] = found
        return found

    def service(self, service_id: str) -> ServiceRecord | None:
        return self._credentials(service_id)[0]

    def secrets(self, service_id: str) -> tuple[tuple[SecretSlot, bytes], ...]:
        """The current secret's hash and, within its grace period, the previous one's, each with
        its slot: only the current secret may rotate itself."""
        return self._credentials(service_id)[1]

    def workload_credentials(self, service_id: str) -> ServiceCredentials | None:
        """The credentials `service_id` may log in with (None: no such service), read once
        per batch."""
        if service_id in self._workload:
            return self._workload[service_id]
        service, secrets = self._credentials(service_id)
        # Read for an unknown id too (no rows): a login's time must not say whether the id
        # exists (DESIGN: same timing), and this query is most of a workload login's.
        rows = self._rows("workload", {"service_id": service_id})
        found = None
        if service is not None:
            found = ServiceCredentials.of(
                service_id,
                any(slot == "current" for slot, _ in secrets),
                [_credential(r) for r in rows],
            )
        self._workload[service_id] = found
        return found

    def federated_binding(self, trust: str, subject: str) -> str | None:
        """The service a federated (trust, subject) is bound to, if any."""
        found = self._scalar("federated_binding", {"trust": trust, "subject": subject})
        return None if found is None else str(found)

    def use_assertion(self, service_id: str, jti: str, expires_at: datetime) -> bool:
        """Record the use of a client assertion's `jti` until `expires_at`; False: a replay.

        True the first time, or when the jti's earlier use has expired. One upsert: on
        PostgreSQL a replica racing on the same jti waits for this batch's row to commit and
        then finds it (False); on SQLite the batches take turns.
        """
        cursor = self._execute(
            "use_assertion",
            {
                "service_id": service_id,
                "jti": jti,
                "expires_at": _utc_in(expires_at),
                "now": self.now,
            },
        )
        return _rowcount(cursor) == 1

    def failures(self, id_key: str, peer_key: str) -> tuple[int, int]:
        """Failures counted for a login's id and peer in the current window, this batch's own
        included."""
        counts = self._failures
        if id_key not in counts or peer_key not in counts:
            found = dict(
                self._rows(
                    "failures", {"id_key": id_key, "peer_key": peer_key, "cutoff": self._cutoff}
                )
            )
            counts.setdefault(id_key, found.get(id_key, 0))
            counts.setdefault(peer_key, found.get(peer_key, 0))
        return counts[id_key], counts[peer_key]

    def known_peer_since(self, service_id: str, peer: str) -> datetime | None:
        """When `peer` last logged in as `service_id` (None: never, or forgotten)."""
        at = self._scalar("known_peer", {"service_id": service_id, "peer": peer})
        return None if at is None else _utc_out(at)

    def count_failure(self, key: str) -> None:
        """One more failure for a key read with failures()."""
        self._execute("count_failure", {"key": key, "now": self.now, "cutoff": self._cutoff})
        self._failures[key] += 1

    def reset_failures(self, key: str) -> None:
        self._execute("reset_failures", {"key": key})
        self._failures[key] = 0

    def remember_peer(self, service_id: str, peer: str) -> None:
        """Record a successful login from `peer` (once per batch and pair)."""
        if (service_id, peer) in self._peers_remembered:
            return
        self._execute("remember_peer", {"service_id": service_id, "peer": peer, "now": self.now})
        self._peers_remembered.add((service_id, peer))

    def audit(
        self,
        *,
        actor: str,
        action: str,
        target: str,
        outcome: str,
        peer: str,
        request_id: str,
        detail: str = "",
    ) -> None:
        """Add an audit row; the batch's rows are inserted together at commit."""
        self._audit.append(
            {
                "at": self.now,
                "actor": actor,
                "action": action,
                "target": target,
                "outcome": outcome,
                "peer": peer,
                "request_id": request_id,
                "detail": detail,
            }
        )

    def aggregate(
        self,
        key: str,
        *,
        actor: str,
        action: str,
        target: str,
        outcome: str,
        peer: str,
        request_id: str,
        detail: str = "",
    ) -> None:
        """Count one attempt on the aggregated row `key` (created by its first attempt, whose
        fields it keeps); the batch writes each key once, at commit."""
        found = self._aggregates.get(key)
        if found is not None:
            found["count"] = cast(int, found["count"]) + 1
            return
        self._aggregates[key] = {
            "at": self.now,
            "actor": actor,
            "action": action,
            "target": target,
            "outcome": outcome,
            "peer": peer,
            "request_id": request_id,
            "detail": detail,
            "count": 1,
            "aggregate_key": key,
        }

    def flush(self) -> None:
        if self._audit:
            self._execute("audit", self._audit)
            self._audit = []
        for key, params in self._aggregates.items():
            total = self._scalar("aggregate", params)
            if total == params["count"]:
                self.created_aggregates.add(key)
        self._aggregates = {}


def _rowcount(result: object) -> int:
    return int(getattr(result, "rowcount", 0))
