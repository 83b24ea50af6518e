"""Tokens: IssueToken's policy and ValidateToken's rules, for the RPCs and anything else.

An IssueToken is one login (`authsvc.usecases.logins`) with an `IssuePolicy`: inside the login
batch's transaction the policy decides the audience and scopes and prepares the token (jti
and all), the batch commits the audit row naming that jti, and only then does the policy's
`complete` spend an RSA signature on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from authsvc.clock import Clock
from authsvc.config import Settings
from authsvc.crypto.secrets import SecretHasher
from authsvc.errors import AuthsvcError, InvalidArgument, PermissionDenied
from authsvc.inputs import check_name, check_scopes, check_service_id
from authsvc.storage.records import ServiceRecord
from authsvc.sync import Signer
from authsvc.tokens.issuer import IssuedToken, TokenIssuer, UnsignedToken
from authsvc.usecases.audit import Origin
from authsvc.usecases.login_batch import LoginBatcher
from authsvc.usecases.logins import Login, SecretCredential, Verdict
from authsvc_client.claims import ValidationResult
from authsvc_client.v1 import auth_pb2
from authsvc_client.verifier import TokenVerifier

__all__ = [
    "AUDIENCE_DENIED",
    "SCOPE_DENIED",
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


@dataclass(frozen=True)
class TokenRequest:
    """What a service asks IssueToken for, with the secret it proves itself with."""

    service_id: str
    secret: str = field(repr=False)
    audience: str
    scopes: Sequence[str] = ()
    ttl_seconds: int = 0  # 0: the server's default

    def check(self) -> None:
        """The request's input rules (authsvc.inputs), before anything is looked up.

        Raises:
            InvalidArgument: a field missing, too long or outside its grammar.
        """
        check_service_id(self.service_id)
        if not self.secret or len(self.secret) > MAX_SECRET_LENGTH:
            raise InvalidArgument("service_secret is required")
        check_name(self.audience, "audience")
        check_scopes(self.scopes, "scopes")
        if self.ttl_seconds < 0:
            raise InvalidArgument("ttl_seconds must not be negative")


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

    request: TokenRequest
    signer: Signer
    issuer: TokenIssuer
    ttl_seconds: int
    admin_audience: str
    now: Callable[[], float]

    def decide(self, service: ServiceRecord) -> Verdict[UnsignedToken]:
        """The audience and scopes it may have, then the token, prepared so that its audit row
        (naming the jti) is written before it is signed."""
        audience = self.request.audience
        wanted = tuple(dict.fromkeys(self.request.scopes))
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
            return Verdict.deny(
                "scope_denied", audience, PermissionDenied(SCOPE_DENIED + " ".join(denied))
            )
        unsigned = self.issuer.prepare(
            key_bits=self.signer.private_key.key_size,
            kid=self.signer.kid,
            subject=service.service_id,
            audience=audience,
            scopes=wanted,
            ttl_seconds=self.ttl_seconds,
            now=self.now(),
        )
        return Verdict.grant(unsigned, audience, f"jti={unsigned.claims.jti}")

    def complete(self, prepared: UnsignedToken) -> IssuedToken:
        return self.issuer.sign(prepared, self.signer.private_key)


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
    ) -> None:
        """`signer` returns the active signing key as this replica last loaded it."""
        self._s = settings
        self._signer = signer
        self._issuer = issuer
        self._hasher = hasher
        self._clock = clock
        self._logins = logins
        self._verifier = verifier

    async def issue(self, request: TokenRequest, origin: Origin) -> IssuedToken:
        """A signed token for the authenticated service, audited before it is signed.

        Raises:
            InvalidArgument: the request breaks an input rule.
            PermissionDenied: an audience or scope the service may not have.
            AuthsvcError: what the login batch raises (bad credentials, throttled, …), or no
                active signing key.
        """
        request.check()
        signer = self._signer()
        if signer is None:
            raise AuthsvcError("no active signing key")
        s = self._s
        policy = IssuePolicy(
            request=request,
            signer=signer,
            issuer=self._issuer,
            ttl_seconds=min(request.ttl_seconds or s.default_ttl_seconds, s.max_ttl_seconds),
            admin_audience=s.admin_audience,
            now=self._clock.now,
        )
        credential = SecretCredential.present(self._hasher, request.service_id, request.secret)
        return await self._logins.settle(Login(credential, origin, "issue_token"), policy)

    def validate(
        self, token: str, audience: str, required_scopes: Sequence[str] = ()
    ) -> ValidationResult:
        """The verdict on `token` for a service validating it as `audience`.

        Raises:
            InvalidArgument: empty token or audience, token over the size limit, bad scopes.
        """
        check_token_size(token, self._s.max_token_bytes)
        if not audience:
            raise InvalidArgument("audience is required (the validating service's own id)")
        check_scopes(required_scopes, "required_scopes")
        return self._verifier.verify(token, audience=audience, required_scopes=required_scopes)

    def validate_in_stream(
        self, token: str, audience: str, required_scopes: Sequence[str] = ()
    ) -> ValidationResult:
        """`validate` for one message of a stream: a request it refuses with InvalidArgument
        is answered valid=false MALFORMED instead, since ending the stream would fail every
        other check the client multiplexes on it."""
        try:
            return self.validate(token, audience, required_scopes)
        except InvalidArgument:
            return _STREAM_MALFORMED
