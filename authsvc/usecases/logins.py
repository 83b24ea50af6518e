"""Logins: who presents what, and the one interface every kind of credential implements.

A login is decided inside the login batch's transaction (`authsvc.usecases.login_batch`),
which owns the rules every kind shares: throttling, the failure counters and their reset, the
known peer, disabled services, the audit row. What differs between kinds is only how a
presented credential is checked against what storage holds for the service, so that is all a
`Credential` does: a secret (`SecretCredential`), a signed assertion (`AssertionCredential`,
RFC 7523), the verified client certificate of the call (`CertificateCredential`, RFC 8705) or a
federated workload token (`FederatedCredential`). Each kind fails the same way (one generic
UNAUTHENTICATED, counted by the same throttle); its typed reason reaches only the audit row.

What a caller does with an authenticated service (IssueToken: which audience and scopes, then
a signature) is a `LoginPolicy`, run in the same transaction so that its decision is audited
with the login, and completed after the commit so that nothing is handed out before its audit
row is durable.
"""

from __future__ import annotations

import functools
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from secrets import randbits
from typing import ClassVar, Generic, Protocol, TypeVar

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from authsvc.clock import to_datetime, to_timestamp
from authsvc.crypto.secrets import SecretHasher
from authsvc.errors import AuthsvcError
from authsvc.storage.records import SecretSlot, ServiceRecord
from authsvc.storage.repository import LoginBatch
from authsvc.usecases.audit import Origin
from authsvc.workload.assertions import VerifiedAssertion, verify_assertion
from authsvc.workload.certificates import match_certificate
from authsvc.workload.errors import Reason, WorkloadAuthError
from authsvc.workload.federation import FederatedIdentity
from authsvc.workload.public_keys import RegisteredKey, key_from_jwk, key_from_public_key

__all__ = [
    "BAD_CREDENTIALS",
    "CURRENT_ONLY",
    "AssertionCredential",
    "CertificateCredential",
    "Credential",
    "CredentialMatch",
    "FederatedCredential",
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


def _stand_in_keys() -> tuple[RegisteredKey, ...]:
    """One public key of each accepted type, registered to no service: an assertion for an
    unknown id (or an id with no keys) is verified against them, so that it costs the
    signature check a known id's costs. Whatever that check says, the login is refused, so
    the keys need no private half: the RSA modulus is a random odd 2048-bit number (as
    costly to verify with as a real one), made without the price of generating primes."""
    modulus = (1 << 2047) | randbits(2047) | 1
    return (
        key_from_public_key(rsa.RSAPublicNumbers(65537, modulus).public_key()),
        key_from_public_key(ec.generate_private_key(ec.SECP256R1()).public_key()),
        key_from_public_key(ed25519.Ed25519PrivateKey.generate().public_key()),
    )


_STAND_IN_KEYS = _stand_in_keys()
# Matched against for an unknown id's certificate login (parsing the certificate is the cost;
# the `.invalid` name, RFC 2606, is no service's).
_STAND_IN_SANS = ("spiffe://authsvc.invalid/no-such-service",)

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
    # For the audit row only (never the caller): why it failed, or which registered
    # credential matched ("reason=replayed", "key=<kid>", "san=spiffe://…").
    detail: str = ""

    @classmethod
    def refused(cls, reason: Reason) -> CredentialMatch:
        return cls(ok=False, current=False, detail=f"reason={reason.value}")


class Credential(Protocol):
    """A credential presented for a service id, checked inside the login's transaction."""

    @property
    def kind(self) -> str:
        """The credential kind, written on the login's audit row ("secret", …)."""
        ...

    @property
    def service_id(self) -> str:
        """The service it claims to be; "" when only the transaction can tell (`resolve`)."""
        ...

    def resolve(self, txn: LoginBatch) -> str:
        """The service id the login is for, read in the login's transaction when the
        credential itself does not name one (a federated token names a subject, bound to a
        service); "" when none is bound (the login then fails as an unknown id)."""
        ...

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

    def resolve(self, txn: LoginBatch) -> str:
        return self.service_id

    def check(self, txn: LoginBatch, service: ServiceRecord | None) -> CredentialMatch:
        # Every live secret (current and, within its grace period, previous) is compared, so
        # the timing does not depend on which one matched. A secretless service (no secret
        # row at all) is compared against the stand-in as an unknown id is, and never matches.
        secrets = txn.secrets(self.service_id) if service is not None else ()
        has_secret = bool(secrets)
        ok = current = False
        for slot, stored in secrets or _NO_SECRETS:
            matched = hmac.compare_digest(self.digest, stored)
            ok |= matched
            current |= matched and slot == "current"
        if service is not None and not has_secret:
            return CredentialMatch(ok=False, current=False, detail="reason=no_secret")
        return CredentialMatch(ok=ok and service is not None, current=current)


@functools.lru_cache(maxsize=4096)
def _registered_key(jwk_json: str) -> RegisteredKey:
    """A stored public JWK, parsed once per process (the JSON is the cache key, so a changed
    key is a new entry; parsing an RSA key costs more than verifying with it)."""
    return key_from_jwk(json.loads(jwk_json))


@dataclass(frozen=True)
class AssertionCredential:
    """A JWT the service signed with one of its registered keys (RFC 7523 `private_key_jwt`).

    Verified inside the login's transaction, against the keys that transaction reads, so a key
    removed on one replica refuses the next login on every replica; its `jti` is recorded in
    the same transaction, so a second use fails on any replica (PostgreSQL makes the second
    writer wait for the first's commit and then see its row).
    """

    kind: ClassVar[str] = "assertion"
    service_id: str
    assertion: str = field(repr=False)
    # The server's issuer: the only `aud` accepted.
    issuer: str
    leeway: int

    def resolve(self, txn: LoginBatch) -> str:
        return self.service_id

    def check(self, txn: LoginBatch, service: ServiceRecord | None) -> CredentialMatch:
        registered = txn.workload_credentials(self.service_id)  # read for unknown ids too
        if service is None or registered is None or not registered.public_keys:
            self._stand_in_verification(txn)
            return CredentialMatch.refused(Reason.NO_KEY)
        keys = [_registered_key(jwk) for _, jwk in registered.public_keys]
        try:
            verified = self._verify(txn, keys)
        except WorkloadAuthError as exc:
            if exc.reason is Reason.ALGORITHM_NOT_ALLOWED:
                # No key of the service verifies the assertion's `alg` (keys of another type):
                # refused before any signature check, which an unknown id's stand-ins make, so
                # the answer would come sooner for this known id. Spend the same check. (An
                # `alg` no key type allows, `none` or HMAC, is refused before it either way.)
                self._stand_in_verification(txn)
            return CredentialMatch.refused(exc.reason)
        until = to_datetime(verified.remember_jti_until)
        if not txn.use_assertion(self.service_id, verified.jti, until):
            return CredentialMatch.refused(Reason.REPLAYED)
        return CredentialMatch(ok=True, current=True, detail=f"key={verified.key_id}")

    def _stand_in_verification(self, txn: LoginBatch) -> None:
        """The verification a known id's refused login costs, against keys nobody holds, for
        a login refused whatever it says (so the refusal takes as long)."""
        try:
            self._verify(txn, _STAND_IN_KEYS)
        except WorkloadAuthError:
            pass

    def _verify(self, txn: LoginBatch, keys: Sequence[RegisteredKey]) -> VerifiedAssertion:
        return verify_assertion(
            self.assertion,
            service_id=self.service_id,
            keys=keys,
            issuer=self.issuer,
            now=to_timestamp(txn.now),
            leeway=self.leeway,
        )


@dataclass(frozen=True)
class CertificateCredential:
    """The client certificate of the call, already verified by TLS against
    AUTHSVC_TLS_CLIENT_CA; it logs in as a service registered with one of its SANs (exact)."""

    kind: ClassVar[str] = "certificate"
    service_id: str
    # The leaf as gRPC's auth context gives it (`x509_pem_cert`).
    certificate_pem: str = field(repr=False)

    def resolve(self, txn: LoginBatch) -> str:
        return self.service_id

    def check(self, txn: LoginBatch, service: ServiceRecord | None) -> CredentialMatch:
        registered = txn.workload_credentials(self.service_id)  # read for unknown ids too
        if service is None or registered is None or not registered.tls_sans:
            # Reads the certificate as a known id's login does, and is refused whatever it says.
            try:
                match_certificate(self.certificate_pem, _STAND_IN_SANS)
            except WorkloadAuthError:
                pass
            return CredentialMatch.refused(Reason.IDENTITY_MISMATCH)
        try:
            matched = match_certificate(self.certificate_pem, registered.tls_sans)
        except WorkloadAuthError as exc:
            return CredentialMatch.refused(exc.reason)
        return CredentialMatch(ok=True, current=True, detail=f"san={matched.identity}")


@dataclass(frozen=True)
class FederatedCredential:
    """A workload token of a trusted external issuer, verified before the login is queued
    (its keys may need a fetch, which must not hold the login batch): `identity` is what
    verified, or None with the `failure` that refused it (still counted by the throttle).

    The service is the one bound to exactly (trust, subject), read in the login's transaction.
    """

    kind: ClassVar[str] = "federated"
    identity: FederatedIdentity | None
    failure: Reason | None = None
    # The service the caller named, if any: it must be the bound one.
    named_service_id: str = ""

    @property
    def service_id(self) -> str:
        return ""

    def resolve(self, txn: LoginBatch) -> str:
        if self.identity is None:
            return ""
        bound = txn.federated_binding(self.identity.trust_name, self.identity.subject)
        if bound is None or (self.named_service_id and bound != self.named_service_id):
            return ""
        return bound

    def check(self, txn: LoginBatch, service: ServiceRecord | None) -> CredentialMatch:
        if self.identity is None:
            return CredentialMatch.refused(self.failure or Reason.MALFORMED)
        if service is None:
            return CredentialMatch.refused(Reason.IDENTITY_MISMATCH)
        detail = f"trust={self.identity.trust_name} subject={self.identity.subject}"
        return CredentialMatch(ok=True, current=True, detail=detail)


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
        """Runs in the caller's thread (an RPC's: the event loop) once the verdict is
        committed; a failure here reaches that caller only."""
        ...
