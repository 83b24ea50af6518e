"""Logins: who presents what, and the one interface every kind of credential implements.

A login is decided inside the login batch's transaction (`authsvc.usecases.login_batch`),
which owns the rules every kind shares: throttling, the failure counters and their reset, the
known peer, disabled services, the audit row. What differs between kinds is only how a
presented credential is checked against what storage holds for the service, so that is all a
`Credential` does. Secrets are the one kind today; signed assertions, client certificates and
federated tokens each add one class here (or in their own module) and nothing else.

What a caller does with an authenticated service (IssueToken: which audience and scopes, then
a signature) is a `LoginPolicy`, run in the same transaction so that its decision is audited
with the login, and completed after the commit so that nothing is handed out before its audit
row is durable.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import ClassVar, Generic, Protocol, TypeVar

from authsvc.crypto.secrets import SecretHasher
from authsvc.errors import AuthsvcError
from authsvc.storage.records import SecretSlot, ServiceRecord
from authsvc.storage.repository import LoginBatch
from authsvc.usecases.audit import Origin

__all__ = [
    "BAD_CREDENTIALS",
    "CURRENT_ONLY",
    "Credential",
    "CredentialMatch",
    "Login",
    "LoginPolicy",
    "SecretCredential",
    "Verdict",
]

# One answer for a wrong secret and an unknown id, so the answer does not tell them apart.
BAD_CREDENTIALS = "invalid service credentials"
CURRENT_ONLY = (
    "only the current secret (or an admin) may do this; "
    "a previous secret in its grace period may only get tokens"
)

# Compared against for an unknown service id, so that it costs what a known one does.
_NO_SECRETS: tuple[tuple[SecretSlot, bytes], ...] = (("current", bytes(32)),)

P = TypeVar("P")
T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


@dataclass(frozen=True)
class CredentialMatch:
    """How a presented credential compared with the service's stored ones."""

    ok: bool
    # It matched the current credential, not one kept for a grace period after a rotation:
    # only the current one may replace itself.
    current: bool


class Credential(Protocol):
    """A credential presented for a service id, checked inside the login's transaction."""

    @property
    def kind(self) -> str:
        """The credential kind, written on the login's audit row ("secret", …)."""
        ...

    @property
    def service_id(self) -> str: ...

    def check(self, txn: LoginBatch, service: ServiceRecord | None) -> CredentialMatch:
        """Compare with what `txn` holds for the service.

        `service` is None for an id that does not exist: the check must then cost what a
        known id's would (an attacker times the answer to learn which ids exist) and fail.
        """
        ...


@dataclass(frozen=True)
class SecretCredential:
    """A service secret, carried as its HMAC under the server's hash key (as storage keeps it):
    the secret itself never reaches the login batch."""

    kind: ClassVar[str] = "secret"
    service_id: str
    digest: bytes = field(repr=False)

    @classmethod
    def present(cls, hasher: SecretHasher, service_id: str, secret: str) -> SecretCredential:
        """The HMAC is computed here, in the caller's thread, for every login, known id or
        not, so an unknown id costs what a known one does."""
        return cls(service_id=service_id, digest=hasher.hash(secret))

    def check(self, txn: LoginBatch, service: ServiceRecord | None) -> CredentialMatch:
        # Every live secret (current and, within its grace period, previous) is compared, so
        # the timing does not depend on which one matched.
        secrets = txn.secrets(self.service_id) if service is not None else _NO_SECRETS
        ok = current = False
        for slot, stored in secrets:
            matched = hmac.compare_digest(self.digest, stored)
            ok |= matched
            current |= matched and slot == "current"
        return CredentialMatch(ok=ok and service is not None, current=current)


@dataclass(frozen=True)
class Login:
    """One login waiting for its verdict."""

    credential: Credential
    # Peer and request id of the call; its actor is the service the credential names.
    origin: Origin
    action: str
    # True for what only the current credential may do (rotating it): a previous secret still
    # in its grace period authenticates, but is refused with PermissionDenied.
    current_only: bool = False

    @property
    def service_id(self) -> str:
        return self.credential.service_id


@dataclass(frozen=True)
class Verdict(Generic[P]):
    """A policy's decision on an authenticated service, audited with the login."""

    outcome: str  # "ok", or why the login may not do it ("audience_denied", …)
    target: str
    detail: str = ""
    # Raised to the caller instead of a result (the audit row is written all the same).
    error: AuthsvcError | None = None
    # What the policy prepared, completed after the commit (IssueToken: the unsigned token).
    prepared: P | None = None

    @classmethod
    def grant(cls, prepared: P, target: str, detail: str = "") -> Verdict[P]:
        return cls("ok", target, detail, prepared=prepared)

    @classmethod
    def deny(cls, outcome: str, target: str, error: AuthsvcError) -> Verdict[P]:
        return cls(outcome, target, error=error)


class LoginPolicy(Protocol[P, T_co]):
    """What an authenticated login may do: decided in the transaction, done after it."""

    def decide(self, service: ServiceRecord) -> Verdict[P]:
        """Runs in the login batch's thread, inside its transaction: no I/O of its own."""
        ...

    def complete(self, prepared: P) -> T_co:
        """Runs in the login batch's thread once the verdict is committed."""
        ...
