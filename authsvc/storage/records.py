"""Immutable rows handed out by the repository; every datetime is aware UTC."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, NamedTuple

SecretSlot = Literal["current", "previous"]
KeyState = Literal["next", "active", "retired", "revoked"]
ChangeKind = Literal["key", "service", "trust"]
# The wrapped_keys row holding the secret-hash key; its kek_id is the KEK new data is wrapped
# under (Repository.fetch_wrapping_kek_id).
SECRET_HASH_KEY = "secret-hash"  # noqa: S105 (a row name, not a secret)
# What a revocation revokes: one token, a service's tokens, or a disabled service's tokens.
RevocationKind = Literal["token", "service_tokens", "service_disabled"]


class AudienceGrant(NamedTuple):
    """The scopes a service may have in tokens for one audience (none: a scopeless token).

    A NamedTuple, as HeldRevocation: every login builds its service's grants.
    """

    audience: str
    scopes: tuple[str, ...]


@dataclass(frozen=True)
class ServiceRecord:
    service_id: str
    # The audiences the service may get tokens for, in the order granted, each with its own
    # scopes (migration 0006): a token for one audience never carries another's scope.
    grants: tuple[AudienceGrant, ...]
    disabled: bool
    created_at: datetime
    updated_at: datetime

    @property
    def audiences(self) -> tuple[str, ...]:
        return tuple(g.audience for g in self.grants)

    @property
    def scopes(self) -> tuple[str, ...]:
        """Every scope granted for any audience, first-granted first (the list the API showed
        before grants were per audience, kept for compatibility)."""
        return tuple(dict.fromkeys(s for g in self.grants for s in g.scopes))

    def scopes_for(self, audience: str) -> tuple[str, ...] | None:
        """The scopes granted for `audience`; None when the audience is not granted at all."""
        for g in self.grants:
            if g.audience == audience:
                return g.scopes
        return None


@dataclass(frozen=True)
class SecretRecord:
    service_id: str
    slot: SecretSlot
    # Only a keyed hash, but still kept out of reprs and logs.
    secret_hash: bytes = field(repr=False)
    created_at: datetime
    expires_at: datetime | None


@dataclass(frozen=True)
class SigningKeyRecord:
    kid: str
    state: KeyState
    created_at: datetime
    activated_at: datetime | None
    retired_at: datetime | None
    publish_until: datetime | None
    public_jwk: str
    # Wrapped under the KEK; None once the key is retired or revoked.
    private_key_enc: bytes | None = field(repr=False)
    # The KEK that wraps private_key_enc (KeyEncryptionKey.kek_id); None without a private part.
    kek_id: str | None = None


@dataclass(frozen=True)
class WrappedKeyRecord:
    name: str
    kek_id: str
    wrapped: bytes = field(repr=False)
    updated_at: datetime


@dataclass(frozen=True)
class RevocationRecord:
    cursor: int
    jti: str | None
    service_id: str | None
    revoked_before: datetime | None
    expires_at: datetime
    reason: str
    created_at: datetime
    kind: RevocationKind = "token"


class HeldRevocation(NamedTuple):
    """What a replica holds of a revocation in memory; times are whole epoch seconds.

    The full RevocationRecord costs several times as much to build, and a replica starting
    beside a million revocations builds one per revocation.
    """

    cursor: int
    jti: str | None
    service_id: str | None
    revoked_before: int | None
    expires_at: int
    kind: RevocationKind = "token"


@dataclass(frozen=True)
class ChangeRecord:
    cursor: int
    kind: ChangeKind
    ref: str
    created_at: datetime


@dataclass(frozen=True)
class AuditRecord:
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    outcome: str
    peer: str
    request_id: str
    detail: str
    # An aggregated row (see AuditEventRow): `count` attempts from `first_at` until `at`.
    count: int = 1
    first_at: datetime | None = None


# -- workload identity (issue 14; migration 0007) ------------------------------------------------

# What a service_credentials row registers: a public key for signed assertions (ref = its key
# id, value = its public JWK as JSON), a certificate identity (ref = value = the exact URI or DNS
# SAN), or a federated subject (ref = the trust's name, value = the exact subject).
CredentialKind = Literal["public_key", "tls_san", "federated"]


class CredentialRecord(NamedTuple):
    """One registered workload credential of a service (see CredentialKind)."""

    kind: CredentialKind
    ref: str
    value: str


@dataclass(frozen=True)
class ServiceCredentials:
    """Everything but the secret a service may log in with, as one login reads it."""

    service_id: str
    has_secret: bool
    # (key id, public JWK as JSON), in registration order.
    public_keys: tuple[tuple[str, str], ...] = ()
    tls_sans: tuple[str, ...] = ()
    # (trust name, subject).
    federated: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(
        cls, service_id: str, has_secret: bool, rows: Sequence[CredentialRecord]
    ) -> ServiceCredentials:
        return cls(
            service_id,
            has_secret,
            tuple((r.ref, r.value) for r in rows if r.kind == "public_key"),
            tuple(r.value for r in rows if r.kind == "tls_san"),
            tuple((r.ref, r.value) for r in rows if r.kind == "federated"),
        )

    @property
    def kinds(self) -> tuple[str, ...]:
        """The credential kinds it can log in with ("secret", "assertion", "certificate",
        "federated"), as the audit rows and `services list` name them."""
        found = []
        if self.has_secret:
            found.append("secret")
        if self.public_keys:
            found.append("assertion")
        if self.tls_sans:
            found.append("certificate")
        if self.federated:
            found.append("federated")
        return tuple(found)


@dataclass(frozen=True)
class TrustRecord:
    """An external issuer trusted for federated workload tokens (`authsvc trust add`)."""

    name: str
    issuer: str
    audience: str
    # Exactly one of the two: the JWK Set itself (from --jwks-file, stored so every replica
    # has it), or the HTTPS URL to fetch it from.
    jwks_json: str | None
    jwks_url: str | None
    max_lifetime_seconds: int
    created_at: datetime
