"""Services: register, list, change, disable and enable; one rule for the admin RPCs and the CLI.

A service is granted audiences, each with its own scopes (Hydra's audience allow-list plus
scopes, Keycloak's per-client scope mapping): a token for one audience carries only what was
granted for that audience. The plain flags keep the meaning they had when scopes were not tied
to an audience:

- `create --audience A --scope S` grants every `--scope` for every `--audience` named;
- `update --add-audience A` grants A every scope the service has for any audience (the union);
- `update --add-scope S` grants S for each of its audiences, `--remove-scope S` takes it from
  each, `--remove-audience A` takes A with its scopes;
- `--grant A=S` (create, update) grants S for A only (adding A if it is new; `A=` adds A with
  no scope), `--revoke-grant A=S` takes S from A only (A stays, perhaps with no scope).

An update applies its removals first and then its additions, each kind in that order: so
`--remove-scope S --grant A=S` leaves S on A alone, and an added audience gets the union of
what is left. Naming one value both to add and to remove is refused, as is removing what the
service does not have (a typo must not pass as done). A service keeps at least one audience:
disable it instead. Every change writes one audit row.

Workload credentials (issue 14) sit beside the grants: public keys for signed assertions (each
a JWK or PEM, stored as its public JWK under its RFC 7638 thumbprint), exact certificate SANs,
and federated subjects of a trusted issuer. A service may hold several, and may have no secret
at all (`secret=False`) as long as it holds another credential: one with no way to log in is
refused, at creation and when an update would remove its last credential. An update may change
grants only, credentials only, or both. Audit rows name credential kinds, key ids, SANs and
subjects, never key material.

Nothing here knows gRPC: errors are `authsvc.errors` types, mapped to status by the servicer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, overload

from authsvc.clock import Clock, to_datetime, to_timestamp
from authsvc.config import Settings
from authsvc.crypto.secrets import SecretHasher, mint_secret
from authsvc.errors import (
    AlreadyExists,
    AuthsvcError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from authsvc.inputs import (
    MAX_AUDIENCES,
    MAX_SCOPES,
    check_audiences,
    check_name,
    check_new_service_id,
    check_scopes,
    check_service_id,
)
from authsvc.storage.records import (
    AudienceGrant,
    CredentialRecord,
    ServiceCredentials,
    ServiceRecord,
)
from authsvc.storage.repository import AuditEvent, Repository
from authsvc.usecases.audit import AuditTrail, Origin
from authsvc.usecases.revocation import service_cutoff
from authsvc.workload import check_tls_san, parse_public_key
from authsvc_client.claims import ADMIN_SCOPE

__all__ = [
    "MAX_CREDENTIALS_PER_KIND",
    "CredentialChange",
    "CredentialTaken",
    "GrantChange",
    "ServiceRegistry",
    "apply_credentials",
    "credentials_detail",
    "grants_detail",
    "merge_grants",
]

log = logging.getLogger("authsvc.server")

# Public keys, SANs and federated subjects one service may hold, each: enough for a key roll or
# several clusters, and a bound on what every login of the service reads.
MAX_CREDENTIALS_PER_KIND = 32
_MAX_SUBJECT = 256
_MAX_KEY_ID = 256
# What the flags are called where a message names them: the CLI's and the RPC's.
_NO_CREDENTIAL = (
    "a service without a secret needs another credential: --jwk-file, --tls-san or "
    "--federated-subject (public_keys, tls_sans, federated_subjects)"
)


def merge_grants(grants: Iterable[AudienceGrant]) -> tuple[AudienceGrant, ...]:
    """One grant per audience, in first-named order, each scope once."""
    merged: dict[str, dict[str, None]] = {}
    for g in grants:
        merged.setdefault(g.audience, {}).update(dict.fromkeys(g.scopes))
    return tuple(AudienceGrant(a, tuple(scopes)) for a, scopes in merged.items())


def grants_detail(grants: Sequence[AudienceGrant]) -> str:
    """A service's grants as its audit row shows them: `billing=billing.read,billing.write
    inventory=` (an audience with no scope ends in `=`)."""
    return " ".join(f"{g.audience}={','.join(g.scopes)}" for g in grants)


def credentials_detail(credentials: ServiceCredentials) -> str:
    """A service's credentials as an audit row names them: kinds, then key ids, SANs and
    subjects (`credentials=secret,assertion; public_key:KID tls_san:spiffe://…
    federated:TRUST=SUBJECT`). Never key material: a key is named by its thumbprint."""
    refs = _refs(_records_of(credentials), "")
    kinds = ",".join(credentials.kinds) or "none"
    return f"credentials={kinds}" + (f"; {refs}" if refs else "")


def _refs(records: Iterable[CredentialRecord], sign: str) -> str:
    return " ".join(f"{sign}{r.kind}:{_ref_shown(r)}" for r in records)


def _ref_shown(record: CredentialRecord) -> str:
    if record.kind == "federated":
        return f"{record.ref}={record.value}"
    return record.ref


def _records_of(credentials: ServiceCredentials) -> list[CredentialRecord]:
    """The rows a ServiceCredentials was read from (public keys with their JWK)."""
    rows = [CredentialRecord("public_key", kid, jwk) for kid, jwk in credentials.public_keys]
    rows += [CredentialRecord("tls_san", san, san) for san in credentials.tls_sans]
    rows += [CredentialRecord("federated", t, sub) for t, sub in credentials.federated]
    return rows


def _key_of(record: CredentialRecord) -> tuple[str, str, str]:
    """What makes a credential the same one: a key by its id, a SAN, a (trust, subject)."""
    if record.kind == "federated":
        return (record.kind, record.ref, record.value)
    return (record.kind, record.ref, "")


def _public_key_records(texts: Sequence[str], field: str) -> list[CredentialRecord]:
    """Each JWK or PEM text as its stored row; the parser's messages never echo the key."""
    records = []
    for i, text in enumerate(texts):
        try:
            key = parse_public_key(text)
        except InvalidArgument as exc:
            where = f"{field}[{i}]" if len(texts) > 1 else field
            raise InvalidArgument(f"{where}: {exc}") from None
        records.append(CredentialRecord("public_key", key.key_id, key.to_json()))
    return records


def _san_records(sans: Sequence[str], field: str) -> list[CredentialRecord]:
    records = []
    for san in sans:
        try:
            canonical = check_tls_san(san)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{field}: {exc}") from None
        records.append(CredentialRecord("tls_san", canonical, canonical))
    return records


def _check_subject(subject: str, field: str) -> None:
    if not subject or len(subject) > _MAX_SUBJECT:
        raise InvalidArgument(f"{field}: a subject is 1-{_MAX_SUBJECT} characters")
    if not subject.isprintable() or subject != subject.strip():
        raise InvalidArgument(
            f"{field}: a subject is printable characters without surrounding blanks"
        )


def _federated_records(pairs: Sequence[tuple[str, str]], field: str) -> list[CredentialRecord]:
    records = []
    for trust, subject in pairs:
        check_name(trust, f"{field}: trust name")
        _check_subject(subject, field)
        records.append(CredentialRecord("federated", trust, subject))
    return records


def _key_id_records(kids: Sequence[str], field: str) -> list[CredentialRecord]:
    """Public keys to remove, by key id (the thumbprint `services list` shows)."""
    for kid in kids:
        if not kid or len(kid) > _MAX_KEY_ID or not kid.isprintable() or kid != kid.strip():
            raise InvalidArgument(f"{field}: a key id is 1-{_MAX_KEY_ID} printable characters")
    return [CredentialRecord("public_key", kid, "") for kid in kids]


def _no_repeats(records: Sequence[CredentialRecord], field: str) -> None:
    seen: set[tuple[str, str, str]] = set()
    for r in records:
        if _key_of(r) in seen:
            raise InvalidArgument(f"{field}: {r.kind} {_ref_shown(r)} is named twice")
        seen.add(_key_of(r))


def _check_credential_bounds(credentials: ServiceCredentials) -> None:
    if (
        max(len(credentials.public_keys), len(credentials.tls_sans), len(credentials.federated))
        > MAX_CREDENTIALS_PER_KIND
    ):
        raise InvalidArgument(
            f"a service holds at most {MAX_CREDENTIALS_PER_KIND} public keys, "
            f"{MAX_CREDENTIALS_PER_KIND} TLS SANs and {MAX_CREDENTIALS_PER_KIND} federated "
            "subjects"
        )


class CredentialTaken(AlreadyExists):
    """A credential cannot be registered: the service holds it already, or a federated subject
    is bound to another service (a federated token is exchanged for ONE service). Its message
    names the credential by id, SAN or subject, never by key material, so the CLI shows it."""


def _check_grants(grants: Sequence[AudienceGrant], field: str) -> None:
    check_audiences([g.audience for g in grants], field)
    for g in grants:
        check_scopes(g.scopes, field)


def _check_bounds(grants: Sequence[AudienceGrant]) -> None:
    if len(grants) > MAX_AUDIENCES:
        raise InvalidArgument(f"a service has at most {MAX_AUDIENCES} audiences")
    if any(len(g.scopes) > MAX_SCOPES for g in grants):
        raise InvalidArgument(f"an audience carries at most {MAX_SCOPES} scopes")


@dataclass(frozen=True)
class GrantChange:
    """What one `services update` (UpdateService) asks for; see the module docstring."""

    add_audiences: tuple[str, ...] = ()
    remove_audiences: tuple[str, ...] = ()
    add_scopes: tuple[str, ...] = ()
    remove_scopes: tuple[str, ...] = ()
    # Scopes for one audience only; an empty tuple grants the audience with no scope.
    grants: tuple[AudienceGrant, ...] = ()
    revoke_grants: tuple[AudienceGrant, ...] = ()

    @property
    def empty(self) -> bool:
        """True when it changes no grant (an update may then change credentials only)."""
        return not any(
            (
                self.add_audiences,
                self.remove_audiences,
                self.add_scopes,
                self.remove_scopes,
                self.grants,
                self.revoke_grants,
            )
        )

    def check(self) -> None:
        """The input rules, before anything is read: grammar, bounds, no contradiction.

        An empty change passes here: whether the update as a whole changes anything is for
        ServiceRegistry.update to say, with the credentials in view.

        Raises:
            InvalidArgument: a malformed value, or one value named both to add and to remove.
        """
        check_audiences(self.add_audiences, "add_audiences")
        check_audiences(self.remove_audiences, "remove_audiences")
        check_scopes(self.add_scopes, "add_scopes")
        check_scopes(self.remove_scopes, "remove_scopes")
        _check_grants(self.grants, "grants")
        _check_grants(self.revoke_grants, "revoke_grants")
        if any(not g.scopes for g in self.revoke_grants):
            raise InvalidArgument("revoke_grants: each names a scope (remove_audiences takes one)")
        both = set(self.add_audiences) & set(self.remove_audiences)
        both |= set(self.add_scopes) & set(self.remove_scopes)
        granted = {f"{g.audience}={s}" for g in self.grants for s in g.scopes}
        both |= granted & {f"{g.audience}={s}" for g in self.revoke_grants for s in g.scopes}
        if both:
            raise InvalidArgument("named both to add and to remove: " + " ".join(sorted(both)))

    def apply(self, grants: Sequence[AudienceGrant]) -> tuple[AudienceGrant, ...]:
        """The grants after this change (removals, then additions).

        Raises:
            FailedPrecondition: it removes what the service does not have, or its last audience.
            InvalidArgument: the result is over a bound.
        """
        held: dict[str, dict[str, None]] = {g.audience: dict.fromkeys(g.scopes) for g in grants}
        for audience in self.remove_audiences:
            if held.pop(audience, None) is None:
                raise FailedPrecondition(f"audience {audience} is not granted to this service")
        for scope in self.remove_scopes:
            holders = [scopes for scopes in held.values() if scope in scopes]
            if not holders:
                raise FailedPrecondition(f"scope {scope} is not granted to this service")
            for scopes in holders:
                del scopes[scope]
        for g in self.revoke_grants:
            own = held.get(g.audience, {})
            for scope in g.scopes:
                if scope not in own:
                    raise FailedPrecondition(
                        f"scope {scope} is not granted for audience {g.audience}"
                    )
                del own[scope]
        union = dict.fromkeys(s for scopes in held.values() for s in scopes)
        for audience in self.add_audiences:
            held.setdefault(audience, dict(union))
        for scopes in held.values():
            scopes.update(dict.fromkeys(self.add_scopes))
        for g in self.grants:
            held.setdefault(g.audience, {}).update(dict.fromkeys(g.scopes))
        if not held:
            raise FailedPrecondition("a service keeps at least one audience (disable it instead)")
        result = tuple(AudienceGrant(a, tuple(scopes)) for a, scopes in held.items())
        _check_bounds(result)
        return result


@dataclass(frozen=True)
class CredentialChange:
    """The workload credentials one `services update` (UpdateService) adds and removes.

    Removals apply before additions, as for grants, so one update can roll a key (`--jwk-file
    NEW --remove-key OLD`). Public keys are removed by key id, the thumbprint `services list`
    shows; SANs and subjects by value.
    """

    # Each a JWK (JSON object) or a PEM public key.
    add_public_keys: tuple[str, ...] = ()
    remove_public_key_ids: tuple[str, ...] = ()
    add_tls_sans: tuple[str, ...] = ()
    remove_tls_sans: tuple[str, ...] = ()
    # (trust name, subject) pairs.
    add_federated_subjects: tuple[tuple[str, str], ...] = ()
    remove_federated_subjects: tuple[tuple[str, str], ...] = ()

    @property
    def empty(self) -> bool:
        """True when it changes no credential (an update may then change grants only)."""
        return not any(
            (
                self.add_public_keys,
                self.remove_public_key_ids,
                self.add_tls_sans,
                self.remove_tls_sans,
                self.add_federated_subjects,
                self.remove_federated_subjects,
            )
        )

    def check(self) -> tuple[list[CredentialRecord], list[CredentialRecord]]:
        """The input rules, before anything is read; returns the rows to add and to remove.

        Raises:
            InvalidArgument: a malformed key, SAN or subject (a private key given by mistake
                among them), one named twice, or one named both to add and to remove.
        """
        add = _public_key_records(self.add_public_keys, "add_public_keys")
        add += _san_records(self.add_tls_sans, "add_tls_sans")
        add += _federated_records(self.add_federated_subjects, "add_federated_subjects")
        remove = _key_id_records(self.remove_public_key_ids, "remove_public_key_ids")
        remove += _san_records(self.remove_tls_sans, "remove_tls_sans")
        remove += _federated_records(self.remove_federated_subjects, "remove_federated_subjects")
        _no_repeats(add, "credentials to add")
        _no_repeats(remove, "credentials to remove")
        both = {_key_of(r) for r in add} & {_key_of(r) for r in remove}
        if both:
            named = sorted(_ref_shown(r) for r in add if _key_of(r) in both)
            raise InvalidArgument("named both to add and to remove: " + " ".join(named))
        return add, remove


def _what(record: CredentialRecord) -> str:
    name = {"public_key": "public key", "tls_san": "TLS SAN", "federated": "federated subject"}
    return f"{name[record.kind]} {_ref_shown(record)}"


def apply_credentials(
    current: ServiceCredentials,
    add: Sequence[CredentialRecord],
    remove: Sequence[CredentialRecord],
) -> ServiceCredentials:
    """The credentials after a change (removals, then additions), checked against what the
    service holds now, so a refusal comes before anything is written.

    Raises:
        FailedPrecondition: it removes what the service does not hold, or its last way to log
            in (a secretless service keeps at least one credential: disable it instead).
        CredentialTaken: it adds what the service holds already.
        InvalidArgument: the result is over a bound.
    """
    held = {_key_of(r): r for r in _records_of(current)}
    for r in remove:
        if held.pop(_key_of(r), None) is None:
            raise FailedPrecondition(f"{_what(r)} is not registered for this service")
    for r in add:
        if _key_of(r) in held:
            raise CredentialTaken(f"{_what(r)} is already registered for this service")
        held[_key_of(r)] = r
    after = ServiceCredentials.of(current.service_id, current.has_secret, list(held.values()))
    _check_credential_bounds(after)
    if not after.kinds:
        raise FailedPrecondition(
            "that would leave the service no way to log in (it has no secret): add another "
            "credential first, or disable the service"
        )
    return after


class ServiceRegistry:
    """The services use cases. Each call is its own transaction(s) and writes one audit row,
    in the transaction of the change it records (an update of credentials and grants, two
    transactions: in the second), so a change never persists without its row, nor the row
    without its change."""

    def __init__(
        self,
        repo: Repository,
        hasher: SecretHasher,
        clock: Clock,
        settings: Settings,
        trail: AuditTrail,
    ) -> None:
        self._repo = repo
        self._hasher = hasher
        self._clock = clock
        self._s = settings
        self._trail = trail

    def initial_grants(
        self,
        audiences: Sequence[str],
        scopes: Sequence[str],
        grants: Sequence[AudienceGrant] = (),
        *,
        admin: bool = False,
    ) -> tuple[AudienceGrant, ...]:
        """What `create` grants: every scope for every audience named, the per-audience grants,
        and with `admin` scope authsvc.admin for the server's own audience (and no other)."""
        every = tuple(scopes)
        wanted = [AudienceGrant(a, every) for a in audiences]
        wanted += grants
        if admin:
            wanted.append(AudienceGrant(self._s.admin_audience, (ADMIN_SCOPE,)))
        return merge_grants(wanted)

    @overload
    def create(
        self,
        origin: Origin,
        service_id: str,
        audiences: Sequence[str] = (),
        scopes: Sequence[str] = (),
        grants: Sequence[AudienceGrant] = (),
        *,
        admin: bool = False,
        secret: Literal[True] = True,
        public_keys: Sequence[str] = (),
        tls_sans: Sequence[str] = (),
        federated_subjects: Sequence[tuple[str, str]] = (),
    ) -> tuple[ServiceRecord, str]: ...

    @overload
    def create(
        self,
        origin: Origin,
        service_id: str,
        audiences: Sequence[str] = (),
        scopes: Sequence[str] = (),
        grants: Sequence[AudienceGrant] = (),
        *,
        admin: bool = False,
        secret: bool,
        public_keys: Sequence[str] = (),
        tls_sans: Sequence[str] = (),
        federated_subjects: Sequence[tuple[str, str]] = (),
    ) -> tuple[ServiceRecord, str | None]: ...

    def create(
        self,
        origin: Origin,
        service_id: str,
        audiences: Sequence[str] = (),
        scopes: Sequence[str] = (),
        grants: Sequence[AudienceGrant] = (),
        *,
        admin: bool = False,
        secret: bool = True,
        public_keys: Sequence[str] = (),
        tls_sans: Sequence[str] = (),
        federated_subjects: Sequence[tuple[str, str]] = (),
    ) -> tuple[ServiceRecord, str | None]:
        """Register a service; returns it with its secret, shown once and stored only hashed
        (None for a secretless service: `secret=False`, nothing is minted or stored).

        `public_keys` are JWK or PEM texts, `tls_sans` exact SPIFFE IDs or DNS names, and
        `federated_subjects` (trust name, subject) pairs of trusts that exist. The input
        rules run here, so no caller (RPC, CLI, a script) can store a name that a later login
        or token would choke on.

        Raises:
            InvalidArgument: a malformed id, audience, scope, key, SAN or subject, no audience
                at all, or no secret and no other credential.
            FailedPrecondition: a federated subject names a trust that does not exist.
            AlreadyExists: the id is taken; CredentialTaken: a federated subject is bound to
                another service.
        """
        check_new_service_id(service_id)
        check_audiences(audiences)
        check_scopes(scopes, "scopes")
        _check_grants(grants, "grants")
        wanted = self.initial_grants(audiences, scopes, grants, admin=admin)
        if not wanted:
            raise InvalidArgument("at least one audience is required")
        _check_bounds(wanted)
        credentials = _public_key_records(public_keys, "public_keys")
        credentials += _san_records(tls_sans, "tls_sans")
        credentials += _federated_records(federated_subjects, "federated_subjects")
        _no_repeats(credentials, "credentials")
        planned = ServiceCredentials.of(service_id, secret, credentials)
        _check_credential_bounds(planned)
        if not planned.kinds:
            raise InvalidArgument(_NO_CREDENTIAL)
        self._check_federated(service_id, credentials)
        minted = mint_secret() if secret else None
        # The grants as stored: `wanted` is merged, one grant per audience, each scope once.
        detail = grants_detail(wanted)
        if planned.kinds != ("secret",):
            detail += "; " + credentials_detail(planned)
        # Written with the service: should the audit row fail, no service exists, so a retry
        # registers it and shows the one-time secret (instead of "already exists").
        event = self._trail.event(
            origin, action="create_service", target=f"service:{service_id}", detail=detail
        )
        try:
            record = self._repo.create_service(
                service_id,
                wanted,
                None if minted is None else self._hasher.hash(minted),
                to_datetime(self._clock.now()),
                credentials=credentials,
                audit=event,
            )
        except CredentialTaken:
            raise
        except AlreadyExists as exc:
            # A subject bound elsewhere by a create that raced this one; the storage message
            # names trust and subject only.
            if planned.federated and self._repo.fetch_service(service_id) is None:
                raise CredentialTaken(str(exc)) from None
            raise
        self._trail.log(event)
        return record, minted

    def _check_federated(self, service_id: str, records: Sequence[CredentialRecord]) -> None:
        """Each federated subject names a trust that exists and is bound to no other service.

        The database settles a race (one binding per subject fleet-wide); this check gives
        the usual case its clear message.
        """
        for r in records:
            if r.kind != "federated":
                continue
            if self._repo.fetch_trust(r.ref) is None:
                raise FailedPrecondition(
                    f"no trust named {r.ref!r}: add it first (authsvc trust add)"
                )
            bound = self._repo.fetch_federated_binding(r.ref, r.value)
            if bound is not None and bound != service_id:
                raise CredentialTaken(f"{_what(r)} is bound to service {bound!r}")

    def credentials_of(self, service_id: str) -> ServiceCredentials:
        """What a service may log in with besides its grants (`Service.has_secret` etc.).

        Raises:
            NotFound: no such service.
        """
        check_service_id(service_id)
        found = self._repo.fetch_service_credentials(service_id)
        if found is None:
            raise NotFound(f"service {service_id!r} not found")
        return found

    def list_with_credentials(self) -> list[tuple[ServiceRecord, ServiceCredentials]]:
        """Every service with its credentials (`services list`, ListServices): two queries."""
        credentials = self._repo.list_service_credentials()
        listed = []
        for service in self._repo.list_services():
            found = credentials.get(service.service_id)
            if found is None:  # registered between the two queries
                found = self.credentials_of(service.service_id)
            listed.append((service, found))
        return listed

    def list(self) -> list[ServiceRecord]:
        return self._repo.list_services()

    def update(
        self,
        origin: Origin,
        service_id: str,
        change: GrantChange | None = None,
        credentials: CredentialChange | None = None,
    ) -> ServiceRecord:
        """Change a live service's grants, its credentials, or both; the next login on any
        replica sees the change (logins read the service inside their own transaction, never
        from a replica's memory). One audit row.

        Both parts are checked against the service as it is before either is written. They
        are two transactions (credentials, then grants, which writes the audit row); should
        the grants then fail (an update that raced this one, or the audit write), the
        credential change is undone before the error is raised. An update of one part is one
        transaction with its audit row.

        Raises:
            InvalidArgument: nothing to change, or see GrantChange.check and
                CredentialChange.check.
            FailedPrecondition: see GrantChange.apply and apply_credentials; a federated
                subject naming a trust that does not exist.
            CredentialTaken: see apply_credentials; a subject bound to another service.
            NotFound: no such service.
        """
        check_service_id(service_id)
        change = change or GrantChange()
        credentials = credentials or CredentialChange()
        change.check()
        add, remove = credentials.check()
        if change.empty and credentials.empty:
            raise InvalidArgument("nothing to change: name an audience, scope, grant or credential")
        now = to_datetime(self._clock.now())
        before_creds: ServiceCredentials | None = None
        after_creds: ServiceCredentials | None = None
        # The audit row, built inside the transaction that writes it (from what it wrote).
        events: list[tuple[AuditEvent, ServiceRecord]] = []

        def audited(
            before: ServiceRecord, after: ServiceRecord, creds: ServiceCredentials | None
        ) -> AuditEvent:
            detail = grants_detail(after.grants)
            if creds is not None:
                # What it holds now, then what this update took away (-) and added (+).
                kinds = ",".join(creds.kinds) or "none"
                moved = " ".join(x for x in (_refs(remove, "-"), _refs(add, "+")) if x)
                detail += f"; credentials={kinds}; {moved}"
            changed = after.grants != before.grants or creds is not None
            event = self._trail.event(
                origin,
                action="update_service",
                target=f"service:{service_id}",
                outcome="ok" if changed else "unchanged",
                detail=detail,
            )
            events[:] = [(event, after)]
            return event

        if not credentials.empty:
            before_creds = self.credentials_of(service_id)
            if not change.empty:
                current = self._repo.fetch_service(service_id)
                if current is None:
                    raise NotFound(f"service {service_id!r} not found")
                change.apply(current.grants)  # its refusals, before anything is written
            apply_credentials(before_creds, add, remove)
            self._check_federated(service_id, add)
            try:
                after_creds = self._repo.update_service_credentials(
                    service_id,
                    add,
                    remove,
                    now,
                    # Credentials only: this transaction writes the audit row too.
                    audit=(lambda service, creds: audited(service, service, creds))
                    if change.empty
                    else None,
                )
            except CredentialTaken:
                raise
            except AlreadyExists as exc:  # a binding made elsewhere since the check
                raise CredentialTaken(str(exc)) from None
        if not change.empty:
            creds_now = after_creds
            try:
                self._repo.update_service_grants(
                    service_id,
                    lambda s: change.apply(s.grants),
                    now,
                    audit=lambda before, after: audited(before, after, creds_now),
                )
            except Exception:
                if before_creds is not None and after_creds is not None:
                    self._undo_credentials(service_id, before_creds, add, remove)
                raise
        event, after = events[0]
        self._trail.log(event)
        return after

    def _undo_credentials(
        self,
        service_id: str,
        before: ServiceCredentials,
        added: Sequence[CredentialRecord],
        removed: Sequence[CredentialRecord],
    ) -> None:
        """Put back the credentials an update changed before its grants failed."""
        gone = {_key_of(r) for r in removed}
        restore = [r for r in _records_of(before) if _key_of(r) in gone]
        try:
            self._repo.update_service_credentials(
                service_id, restore, list(added), to_datetime(self._clock.now())
            )
        except AuthsvcError:
            log.warning(
                "update_service: the grants change failed and the credential change could "
                "not be undone",
                extra={"service_id": service_id},
            )

    def disable(self, origin: Origin, service_id: str) -> ServiceRecord:
        """Disable a service and revoke every token it holds.

        The revocation is what reaches local validators (they follow WatchRevocations, not the
        services table); replicas also refuse the subject through their disabled set. The
        cutoff is the next whole second: a disabled service cannot get new tokens, so nothing
        legitimate is caught by rounding up (`enable` waits for that second to begin).

        Raises:
            NotFound: no such service.
        """
        check_service_id(service_id)
        now = self._clock.now()
        cutoff = service_cutoff(now)
        event = self._trail.event(origin, action="disable_service", target=f"service:{service_id}")
        # One transaction: the flag, the revocation (kept as long as any token it catches
        # could still validate, leeway included) and the audit row, all or none. A disable
        # without its revocation would leave local validators accepting the service's tokens.
        record = self._repo.disable_service(
            service_id,
            to_datetime(now),
            revoked_before=to_datetime(cutoff),
            revocation_expires_at=to_datetime(
                cutoff + self._s.max_ttl_seconds + self._s.leeway_seconds
            ),
            reason="service disabled",
            audit=event,
        )
        self._trail.log(event)
        return record

    def enable(self, origin: Origin, service_id: str) -> ServiceRecord:
        """Undo a disable: the service may log in again. What the disable revoked stays
        revoked (its revocation is kept until those tokens expire, here and on every local
        validator): only tokens issued from now on are valid.

        `iat` has whole seconds and the disable's cutoff is the next whole second, so a token
        issued within that second would fall before it: the enable waits for the second to
        begin (at most one second) before it lets the service log in.

        Raises:
            NotFound: no such service.
        """
        check_service_id(service_id)
        current = self._repo.fetch_service(service_id)
        if current is None:
            raise NotFound(f"service {service_id!r} not found")
        if not current.disabled:
            self._trail.record(
                origin,
                action="enable_service",
                target=f"service:{service_id}",
                outcome="already_enabled",
            )
            return current
        cutoff = self._repo.fetch_service_cutoff(service_id)
        if cutoff is not None:
            # At most a second ahead as its writer saw it; the bound keeps a clock that
            # stepped back from holding the call.
            wait = min(to_timestamp(cutoff) - self._clock.now(), 1.0)
            if wait > 0:
                self._clock.sleep(wait)
        event = self._trail.event(origin, action="enable_service", target=f"service:{service_id}")
        record = self._repo.update_service_disabled(
            service_id, False, to_datetime(self._clock.now()), audit=event
        )
        self._trail.log(event)
        return record
