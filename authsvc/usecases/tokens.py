"""Tokens: IssueToken's policy and ValidateToken's rules, for the RPCs and anything else.

An IssueToken is one login (`authsvc.usecases.logins`) with an `IssuePolicy`: inside the login
batch's transaction the policy decides the audience and scopes and prepares the token (jti
and all), the batch commits the audit row naming that jti, and only then does the policy's
`complete` spend an RSA signature on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from authsvc.clock import Clock
from authsvc.config import Settings
from authsvc.crypto.secrets import SecretHasher
from authsvc.errors import (
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
)
from authsvc.inputs import check_name, check_scopes, check_service_id
from authsvc.storage.records import ServiceRecord
from authsvc.sync import Signer
from authsvc.tokens.issuer import IssuedToken, TokenIssuer, TokenTooLong, UnsignedToken
from authsvc.usecases.audit import Origin
from authsvc.usecases.login_batch import LoginBatcher
from authsvc.usecases.logins import (
    AssertionCredential,
    CertificateCredential,
    Credential,
    FederatedCredential,
    Login,
    SecretCredential,
    Verdict,
)
from authsvc.workload.assertions import MAX_ASSERTION_BYTES, claimed_service_id
from authsvc.workload.certificates import binding_thumbprint
from authsvc.workload.errors import Reason, WorkloadAuthError
from authsvc.workload.federation import MAX_FEDERATED_TOKEN_BYTES, FederatedIdentity
from authsvc_client.binding import CONFIRMATION_CLAIM, THUMBPRINT_MEMBER
from authsvc_client.claims import (
    ACCESS_TOKEN_TYPE,
    DELEGATION_PARENTS_CLAIM,
    JWT_TOKEN_TYPE,
    Claims,
    ValidationResult,
)
from authsvc_client.unverified import unverified_payload
from authsvc_client.v1 import auth_pb2
from authsvc_client.verifier import TokenVerifier

__all__ = [
    "ACCESS_TOKEN_TYPE",
    "AUDIENCE_DENIED",
    "CHAIN_TOO_DEEP",
    "SCOPE_DENIED",
    "DelegationPolicy",
    "ExchangeRequest",
    "IssuePolicy",
    "TokenRequest",
    "Tokens",
    "check_token_size",
    "scopes_for",
]

# Refusal texts the client package recognises (authsvc_client.tokens): keep them stable.
AUDIENCE_DENIED = "audience not allowed for this service"
SCOPE_DENIED = "scope not allowed for this service: "
MAX_SECRET_LENGTH = 256

_STREAM_MALFORMED = ValidationResult.fail(auth_pb2.MALFORMED)


class FederatedTokenVerifier(Protocol):
    """What ExchangeToken needs of the trusted issuers (authsvc.usecases.federation.TrustStore)."""

    def verify(self, token: str, *, now: float) -> FederatedIdentity:
        """Raises WorkloadAuthError with the reason."""
        ...


CREDENTIAL_REQUIRED = (
    "service_secret or client_assertion is required (or a client certificate on an mTLS "
    "connection, with service_id)"
)


@dataclass(frozen=True)
class TokenRequest:
    """What a service asks IssueToken for, with the credential it proves itself with: its
    secret, a signed assertion, or (neither) the verified client certificate of the call."""

    service_id: str
    secret: str = field(repr=False)
    audience: str
    scopes: Sequence[str] = ()
    ttl_seconds: int = 0  # 0: the server's default
    client_assertion: str = field(default="", repr=False)
    # PEM of the client certificate TLS verified on this call ("" without mTLS).
    client_certificate: str = field(default="", repr=False)

    def check(self) -> None:
        """The request's input rules (authsvc.inputs), before anything is looked up.

        Raises:
            InvalidArgument: a field missing, too long or outside its grammar, or not
                exactly one credential.
        """
        if self.secret and self.client_assertion:
            raise InvalidArgument("send service_secret or client_assertion, not both")
        if self.client_assertion:
            if len(self.client_assertion) > MAX_ASSERTION_BYTES:
                raise InvalidArgument(
                    f"client_assertion is longer than {MAX_ASSERTION_BYTES} bytes"
                )
            if self.service_id:
                check_service_id(self.service_id)
        elif self.secret:
            check_service_id(self.service_id)
            if len(self.secret) > MAX_SECRET_LENGTH:
                raise InvalidArgument("service_secret is too long")
        elif self.client_certificate:
            check_service_id(self.service_id)
        else:
            raise InvalidArgument(CREDENTIAL_REQUIRED)
        _check_wanted(self.audience, self.scopes, self.ttl_seconds)

    def credential(self, hasher: SecretHasher, issuer: str, leeway: int) -> Credential:
        """The credential this request presents, by the rule of `check`."""
        if self.client_assertion:
            # No service_id: the assertion's own `sub` says whose keys to try; the
            # verification then demands iss = sub = that id.
            service_id = self.service_id or _claimable_id(claimed_service_id(self.client_assertion))
            return AssertionCredential(service_id, self.client_assertion, issuer, leeway)
        if self.secret:
            return SecretCredential.present(hasher, self.service_id, self.secret)
        return CertificateCredential(self.service_id, self.client_certificate)


def _claimable_id(claimed: str | None) -> str:
    """The unverified `sub` of an assertion as the service id to try, or "" (an unknown id,
    refused and counted like any) when no service could have it: it goes on to key lookups,
    the audit trail and the throttle's keys, so it meets the rule a named id meets
    (check_service_id: length, printable, not a pasted secret) before any of them."""
    if not claimed:
        return ""
    try:
        check_service_id(claimed)
    except InvalidArgument:
        return ""
    return claimed


def _bound_thumbprint(payload: dict[str, object]) -> str:
    """The `cnf.x5t#S256` a token's payload claims ("" if none); the verifier still checks it
    is well-formed and signed."""
    cnf = payload.get(CONFIRMATION_CLAIM)
    value = cnf.get(THUMBPRINT_MEMBER) if isinstance(cnf, dict) else None
    return value if isinstance(value, str) else ""


def _check_wanted(audience: str, scopes: Sequence[str], ttl_seconds: int) -> None:
    check_name(audience, "audience")
    check_scopes(scopes, "scopes")
    if ttl_seconds < 0:
        raise InvalidArgument("ttl_seconds must not be negative")


SUBJECT_TOKEN_TYPES = (JWT_TOKEN_TYPE, ACCESS_TOKEN_TYPE)
CHAIN_TOO_DEEP = "delegation chain too deep"


@dataclass(frozen=True)
class ExchangeRequest:
    """RFC 8693 ExchangeToken. A federated workload token (`subject_token_type` jwt) for a token
    of the service bound to its subject; or, delegation, an authsvc access token the actor
    received (`access_token`) for a token that keeps its subject and names the actor (`act`),
    the actor authenticating with its own credential (secret, assertion or certificate)."""

    subject_token: str = field(repr=False)
    subject_token_type: str
    audience: str
    scopes: Sequence[str] = ()
    ttl_seconds: int = 0
    # jwt: optional, and then it must be the bound service. access_token: the actor.
    service_id: str = ""
    secret: str = field(default="", repr=False)
    client_assertion: str = field(default="", repr=False)
    client_certificate: str = field(default="", repr=False)

    @property
    def delegating(self) -> bool:
        return self.subject_token_type == ACCESS_TOKEN_TYPE

    def actor(self) -> TokenRequest:
        """The actor's login, by IssueToken's credential rules."""
        return TokenRequest(
            service_id=self.service_id,
            secret=self.secret,
            audience=self.audience,
            scopes=self.scopes,
            ttl_seconds=self.ttl_seconds,
            client_assertion=self.client_assertion,
            client_certificate=self.client_certificate,
        )

    def check(self) -> None:
        """Raises InvalidArgument: an empty or unknown field (RFC 8693 section 2.2.2's
        invalid_request), before anything is verified."""
        if not self.subject_token:
            raise InvalidArgument("subject_token is required")
        if not self.subject_token_type:
            raise InvalidArgument("subject_token_type is required")
        if self.subject_token_type not in SUBJECT_TOKEN_TYPES:
            raise InvalidArgument(
                "subject_token_type: unsupported (supported: "
                + ", ".join(SUBJECT_TOKEN_TYPES)
                + ")"
            )
        if len(self.subject_token) > MAX_FEDERATED_TOKEN_BYTES:
            raise InvalidArgument(f"subject_token is longer than {MAX_FEDERATED_TOKEN_BYTES} bytes")
        if self.delegating:
            self.actor().check()
            return
        if self.secret or self.client_assertion:
            raise InvalidArgument(
                f"actor credentials are only for subject_token_type {ACCESS_TOKEN_TYPE}"
            )
        if self.service_id:
            check_service_id(self.service_id)
        _check_wanted(self.audience, self.scopes, self.ttl_seconds)


def scopes_for(service: ServiceRecord, audience: str) -> tuple[str, ...] | None:
    """Every scope `service` may have in a token for `audience`; None: not that audience.

    The one place that answers it, so that grants per audience change this function only.
    """
    return service.scopes_for(audience)


def check_token_size(token: str, max_bytes: int) -> None:
    """Raises InvalidArgument for an empty token or one over the size limit (never parsed)."""
    if not token:
        raise InvalidArgument("token is required")
    if len(token) > max_bytes:
        raise InvalidArgument(f"token is longer than {max_bytes} bytes")


@dataclass(frozen=True)
class IssuePolicy:
    """IssueToken's policy for an authenticated service, run inside the login's transaction."""

    audience: str
    scopes: tuple[str, ...]
    signer: Signer
    issuer: TokenIssuer
    ttl_seconds: int
    admin_audience: str
    now: Callable[[], float]
    # x5t#S256 of the verified client certificate of the call: the token is bound to it.
    cert_thumbprint: str = ""

    def decide(self, service: ServiceRecord) -> Verdict[UnsignedToken]:
        """The audience and scopes it may have, then the token, prepared so that its audit row
        (naming the jti) is written before it is signed."""
        audience = self.audience
        wanted = tuple(dict.fromkeys(self.scopes))
        allowed = scopes_for(service, audience)
        if allowed is None:
            # Any registered service may follow WatchRevocations, which takes a token for
            # authsvc itself: such a token carries no scope, so it is no admin token.
            if audience != self.admin_audience or wanted:
                return Verdict.deny("audience_denied", audience, PermissionDenied(AUDIENCE_DENIED))
            allowed = ()
        else:
            wanted = wanted or allowed
        denied = [s for s in wanted if s not in allowed]
        if denied:
            return Verdict.deny("scope_denied", audience, _scope_denied(denied))
        return _prepared(
            audience,
            lambda: self.issuer.prepare(
                key_bits=self.signer.private_key.key_size,
                kid=self.signer.kid,
                subject=service.service_id,
                audience=audience,
                scopes=wanted,
                ttl_seconds=self.ttl_seconds,
                now=self.now(),
                cert_thumbprint=self.cert_thumbprint,
            ),
            _detail,
        )

    def complete(self, prepared: UnsignedToken) -> IssuedToken:
        return self.issuer.sign(prepared, self.signer.private_key)


# A refusal names at most this many of the scopes it refused: the status message travels in
# gRPC trailers (8 KiB by default), and 64 long names would not fit.
_NAMED_DENIED_SCOPES = 8


def _scope_denied(denied: Sequence[str]) -> PermissionDenied:
    named = " ".join(denied[:_NAMED_DENIED_SCOPES])
    more = len(denied) - _NAMED_DENIED_SCOPES
    return PermissionDenied(SCOPE_DENIED + named + (f" (and {more} more)" if more > 0 else ""))


def _prepared(
    audience: str, prepare: Callable[[], UnsignedToken], detail: Callable[[UnsignedToken], str]
) -> Verdict[UnsignedToken]:
    """The verdict on a token once prepared: one longer than validators accept is the
    request's fault (INVALID_ARGUMENT), refused before any signature."""
    try:
        unsigned = prepare()
    except TokenTooLong as exc:
        return Verdict.deny("token_too_long", audience, InvalidArgument(str(exc)))
    return Verdict.grant(unsigned, audience, detail(unsigned))


def _detail(unsigned: UnsignedToken) -> str:
    """The audit detail of a granted token: its jti, what binds it, whom it acts for."""
    claims = unsigned.claims
    detail = f"jti={claims.jti}"
    if claims.cert_thumbprint:
        detail += f" x5t#S256={claims.cert_thumbprint}"
    if claims.actors:
        detail += f" subject={claims.subject} actors={','.join(claims.actors)}"
    return detail


@dataclass(frozen=True)
class DelegationPolicy:
    """ExchangeToken on a caller's behalf (RFC 8693 delegation), for an authenticated actor.

    The rules, each here and nowhere else: the subject token was verified for the actor (its
    `aud` is the actor's id); the chain stays within `max_depth`; the audience is granted to
    both the subject's service and the actor (never authsvc itself: no admin by delegation);
    the scopes are within both grants for it; the new token expires no later than the subject
    token; it keeps the subject, names the actor first in `act` and the subject token's jti
    first in `parent_jtis`, so revoking the subject's service, the actor's, or any token up the
    chain revokes it (authsvc_client.verifier checks the chain on every use).
    """

    audience: str
    scopes: tuple[str, ...]
    subject: Claims
    subject_parents: tuple[str, ...]
    subject_service: ServiceRecord
    base: IssuePolicy
    max_depth: int

    def decide(self, service: ServiceRecord) -> Verdict[UnsignedToken]:
        subject, audience = self.subject, self.audience
        if subject.audience != service.service_id:
            return Verdict.deny(
                "subject_not_for_actor",
                audience,
                Unauthenticated("subject_token is not addressed to this actor"),
            )
        if len(subject.actors) + 1 > self.max_depth:
            return Verdict.deny("chain_too_deep", audience, PermissionDenied(CHAIN_TOO_DEEP))
        if self.subject_service.disabled:
            return Verdict.deny(
                "subject_disabled", audience, Unauthenticated("the subject service is disabled")
            )
        theirs = scopes_for(self.subject_service, audience)
        ours = scopes_for(service, audience)
        if audience == self.base.admin_audience or theirs is None or ours is None:
            return Verdict.deny("audience_denied", audience, PermissionDenied(AUDIENCE_DENIED))
        allowed = tuple(s for s in theirs if s in ours)
        wanted = tuple(dict.fromkeys(self.scopes)) or allowed
        denied = [s for s in wanted if s not in allowed]
        if denied:
            return Verdict.deny("scope_denied", audience, _scope_denied(denied))
        now = self.base.now()
        # Never outlives the token it was exchanged from.
        ttl = min(self.base.ttl_seconds, subject.expires_at - int(now))
        if ttl < 1:
            return Verdict.deny(
                "subject_expired", audience, Unauthenticated("subject_token has expired")
            )
        signer = self.base.signer
        return _prepared(
            audience,
            lambda: self.base.issuer.prepare(
                key_bits=signer.private_key.key_size,
                kid=signer.kid,
                subject=subject.subject,
                audience=audience,
                scopes=wanted,
                ttl_seconds=ttl,
                now=now,
                cert_thumbprint=self.base.cert_thumbprint,
                actors=(service.service_id, *subject.actors),
                parent_jtis=(subject.jti, *self.subject_parents),
            ),
            lambda unsigned: f"{_detail(unsigned)} from_jti={subject.jti}",
        )

    def complete(self, prepared: UnsignedToken) -> IssuedToken:
        return self.base.complete(prepared)


class Tokens:
    """IssueToken and ValidateToken (unary and streamed)."""

    def __init__(
        self,
        *,
        settings: Settings,
        signer: Callable[[], Signer | None],
        issuer: TokenIssuer,
        hasher: SecretHasher,
        clock: Clock,
        logins: LoginBatcher,
        verifier: TokenVerifier,
        federation: FederatedTokenVerifier | None = None,
        service_of: Callable[[str], ServiceRecord | None] | None = None,
    ) -> None:
        """`signer` returns the active signing key as this replica last loaded it; `federation`
        verifies federated workload tokens against the trusted issuers (it may fetch keys)."""
        self._s = settings
        self._signer = signer
        self._issuer = issuer
        self._hasher = hasher
        self._clock = clock
        self._logins = logins
        self._verifier = verifier
        self._federation = federation
        # The subject's service as storage holds it (delegation: its grants and whether it is
        # enabled); read in a worker thread.
        self._service_of = service_of

    async def issue(self, request: TokenRequest, origin: Origin) -> IssuedToken:
        """A signed token for the authenticated service, audited before it is signed.

        Raises:
            InvalidArgument: the request breaks an input rule.
            PermissionDenied: an audience or scope the service may not have.
            AuthsvcError: what the login batch raises (bad credentials, throttled, …), or no
                active signing key.
        """
        request.check()
        policy = self._policy(
            request.audience, request.scopes, request.ttl_seconds, request.client_certificate
        )
        s = self._s
        credential = request.credential(self._hasher, s.issuer, s.leeway_seconds)
        return await self._logins.settle(Login(credential, origin, "issue_token"), policy)

    async def exchange(self, request: ExchangeRequest, origin: Origin) -> IssuedToken:
        """RFC 8693 token exchange of a federated workload token: a token for the service
        bound to its (trust, subject), audited before it is signed like any IssueToken.

        The federated token is verified on a worker thread first (its issuer's keys may need
        a bounded fetch, which must not hold the login batch); a failure still goes through
        the login batch, so it is counted and throttled like a wrong secret.

        Raises:
            InvalidArgument: an empty field or an unsupported subject_token_type.
            Unauthenticated: the token is not valid, its issuer not trusted, or its subject
                bound to no service (one generic message for all).
            PermissionDenied, AuthsvcError: as `issue`.
        """
        request.check()
        policy = self._policy(
            request.audience, request.scopes, request.ttl_seconds, request.client_certificate
        )
        if request.delegating:
            return await self._delegate(request, policy, origin)
        credential = await asyncio.to_thread(self._federated, request)
        return await self._logins.settle(Login(credential, origin, "exchange_token"), policy)

    async def _delegate(
        self, request: ExchangeRequest, base: IssuePolicy, origin: Origin
    ) -> IssuedToken:
        """Delegation: the subject token is checked first (as ValidateToken would, for the
        actor as audience: anyone may ask ValidateToken that much), then the actor logs in and
        DelegationPolicy decides in the login's transaction."""
        s = self._s
        credential = request.actor().credential(self._hasher, s.issuer, s.leeway_seconds)
        payload = unverified_payload(request.subject_token) or {}
        # A subject token bound to its caller's certificate (front's, on the hop front ->
        # orders) cannot come with that certificate here: orders holds only its own. The
        # binding already did its job when orders accepted the call; what stops anyone else
        # exchanging it is that it must be addressed to the actor, who must authenticate. So
        # the subject token is checked against its own binding, and the new token is bound to
        # the actor's certificate (base.cert_thumbprint), if it presented one.
        bound_to = _bound_thumbprint(payload)
        result = self._verifier.verify(
            request.subject_token,
            audience=credential.service_id or "-",
            client_cert_thumbprint=bound_to or None,
        )
        if not result.valid or result.claims is None:
            name = auth_pb2.ValidationFailure.Name(result.reason)
            raise Unauthenticated(f"subject_token is not valid for this actor: {name}")
        subject = result.claims
        if self._service_of is None:
            raise InvalidArgument(f"subject_token_type {ACCESS_TOKEN_TYPE} is not served here")
        service = await asyncio.to_thread(self._service_of, subject.subject)
        if service is None:
            raise Unauthenticated("subject_token is not valid for this actor: SERVICE_DISABLED")
        parents = payload.get(DELEGATION_PARENTS_CLAIM) or []
        policy = DelegationPolicy(
            audience=request.audience,
            scopes=tuple(request.scopes),
            subject=subject,
            subject_parents=tuple(str(p) for p in parents),
            subject_service=service,
            base=base,
            max_depth=s.delegation_max_depth,
        )
        return await self._logins.settle(Login(credential, origin, "exchange_token"), policy)

    def _federated(self, request: ExchangeRequest) -> FederatedCredential:
        if self._federation is None:
            return FederatedCredential(None, Reason.UNKNOWN_ISSUER, request.service_id)
        try:
            identity = self._federation.verify(request.subject_token, now=self._clock.now())
        except WorkloadAuthError as exc:
            return FederatedCredential(None, exc.reason, request.service_id)
        return FederatedCredential(identity, None, request.service_id)

    def _policy(
        self, audience: str, scopes: Sequence[str], ttl_seconds: int, client_certificate: str
    ) -> IssuePolicy:
        signer = self._signer()
        if signer is None:  # a database without keys yet, or every key revoked
            raise FailedPrecondition("no active signing key")
        s = self._s
        return IssuePolicy(
            audience=audience,
            scopes=tuple(scopes),
            signer=signer,
            issuer=self._issuer,
            ttl_seconds=min(ttl_seconds or s.default_ttl_seconds, s.max_ttl_seconds),
            admin_audience=s.admin_audience,
            now=self._clock.now,
            cert_thumbprint=binding_thumbprint(client_certificate),
        )

    def validate(
        self,
        token: str,
        audience: str,
        required_scopes: Sequence[str] = (),
        client_cert_thumbprint: str = "",
    ) -> ValidationResult:
        """The verdict on `token` for a service validating it as `audience`.

        Raises:
            InvalidArgument: empty token or audience, token over the size limit, bad scopes.
        """
        check_token_size(token, self._s.max_token_bytes)
        if not audience:
            raise InvalidArgument("audience is required (the validating service's own id)")
        check_scopes(required_scopes, "required_scopes")
        return self._verifier.verify(
            token,
            audience=audience,
            required_scopes=required_scopes,
            client_cert_thumbprint=client_cert_thumbprint or None,
        )

    def validate_in_stream(
        self,
        token: str,
        audience: str,
        required_scopes: Sequence[str] = (),
        client_cert_thumbprint: str = "",
    ) -> ValidationResult:
        """`validate` for one message of a stream: a request it refuses with InvalidArgument
        is answered valid=false MALFORMED instead, since ending the stream would fail every
        other check the client multiplexes on it."""
        try:
            return self.validate(token, audience, required_scopes, client_cert_thumbprint)
        except InvalidArgument:
            return _STREAM_MALFORMED
