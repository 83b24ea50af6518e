"""Immutable rows handed out by the repository; every datetime is aware UTC."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, NamedTuple

SecretSlot = Literal["current", "previous"]
KeyState = Literal["next", "active", "retired", "revoked"]
ChangeKind = Literal["key", "service"]
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
