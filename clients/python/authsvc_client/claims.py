"""Verified access-token claims (RFC 9068 section 2.2) and the outcome of validating a token."""

from __future__ import annotations

import re
from dataclasses import dataclass

from authsvc_client.v1 import auth_pb2

__all__ = [
    "ACCESS_TOKEN_TYPE",
    "ACTOR_CLAIM",
    "ADMIN_SCOPE",
    "ALGORITHM",
    "DEFAULT_LEEWAY_SECONDS",
    "DEFAULT_MAX_TOKEN_BYTES",
    "DELEGATION_PARENTS_CLAIM",
    "JWT_TOKEN_TYPE",
    "MAX_DELEGATION_DEPTH",
    "SCOPE_CLAIM",
    "SCOPE_TOKEN",
    "TOKEN_TYPE",
    "Claims",
    "ValidationResult",
]

# RFC 9068 section 2.1: access tokens are explicitly typed "at+jwt" (RFC 8725 section 3.11).
TOKEN_TYPE = "at+jwt"  # noqa: S105 (a media type, not a password)
# The only algorithm authsvc signs or accepts (RFC 8725 section 3.1: never trust the header's alg).
ALGORITHM = "RS256"
ADMIN_SCOPE = "authsvc.admin"
# RFC 8693 section 3 token type identifiers, stated once for the server and the client package:
# an authsvc access token (a delegation's subject_token, and the issued_token_type of every
# token authsvc issues) and a plain JWT (a federated workload token from a trusted issuer).
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105 - a URN
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"  # noqa: S105 - a URN, not a secret
DEFAULT_MAX_TOKEN_BYTES = 8192
DEFAULT_LEEWAY_SECONDS = 30
# RFC 8693 section 4.1: the actor of a delegated token, nested for longer chains (the outermost
# is the current actor).
ACTOR_CLAIM = "act"
# authsvc's own claim beside `act`: the jtis of the tokens a delegated token was exchanged
# from, nearest first (one per actor), so that revoking any of them revokes it too.
DELEGATION_PARENTS_CLAIM = "parent_jtis"
# The longest chain any validator parses (the server's limit, AUTHSVC_DELEGATION_MAX_DEPTH,
# default 4, may not exceed it): a bound on the work a token can ask for.
MAX_DELEGATION_DEPTH = 16
# RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ), printable ASCII except
# space, double quote and backslash. The one statement of that grammar: the server's input rule
# for requested and required scopes (authsvc.inputs.check_scopes) and the verifier's check of
# the `scope` claim both match it, so a name one accepts the other never refuses.
SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
# RFC 8693 section 4.2: the `scope` claim is scope-tokens joined by single spaces. The token
# class excludes the space, so one match of the whole string equals splitting on " " and
# matching each name.
SCOPE_CLAIM = re.compile(f"{SCOPE_TOKEN.pattern}(?: {SCOPE_TOKEN.pattern})*")


@dataclass(frozen=True, slots=True)
class Claims:
    """The claims of a token whose signature and contents were checked; times in epoch seconds.

    `cert_thumbprint` is the token's RFC 8705 `cnf.x5t#S256`, the certificate it is bound to
    ("" for an unbound bearer token); a validator only returns a bound token's claims to a
    caller that presented that certificate. `actors` is the RFC 8693 delegation chain,
    nearest actor first (empty for a direct token).
    """

    issuer: str
    subject: str
    audience: str
    scopes: tuple[str, ...]
    issued_at: int
    not_before: int
    expires_at: int
    jti: str
    key_id: str
    client_id: str
    cert_thumbprint: str = ""
    actors: tuple[str, ...] = ()

    def to_proto(self) -> auth_pb2.Claims:
        msg = auth_pb2.Claims(
            issuer=self.issuer,
            subject=self.subject,
            audience=self.audience,
            scopes=self.scopes,
            jti=self.jti,
            key_id=self.key_id,
            client_id=self.client_id,
            cert_thumbprint=self.cert_thumbprint,
            actors=self.actors,
        )
        msg.issued_at.seconds = self.issued_at
        msg.not_before.seconds = self.not_before
        msg.expires_at.seconds = self.expires_at
        return msg

    @classmethod
    def from_proto(cls, msg: auth_pb2.Claims) -> Claims:
        return cls(
            issuer=msg.issuer,
            subject=msg.subject,
            audience=msg.audience,
            scopes=tuple(msg.scopes),
            issued_at=int(msg.issued_at.seconds),
            not_before=int(msg.not_before.seconds),
            expires_at=int(msg.expires_at.seconds),
            jti=msg.jti,
            key_id=msg.key_id,
            client_id=msg.client_id,
            cert_thumbprint=msg.cert_thumbprint,
            actors=tuple(msg.actors),
        )


@dataclass(frozen=True, slots=True)
class ValidationResult:
    """Either valid with claims, or invalid with one auth_pb2.ValidationFailure reason.

    Invariant: reason is VALIDATION_FAILURE_UNSPECIFIED exactly when valid, and claims is set
    exactly when valid. Instances are immutable and may be shared.
    """

    valid: bool
    reason: int
    claims: Claims | None

    def __post_init__(self) -> None:
        if self.valid != (self.reason == auth_pb2.VALIDATION_FAILURE_UNSPECIFIED):
            raise ValueError("reason must be VALIDATION_FAILURE_UNSPECIFIED iff the token is valid")
        if self.valid != (self.claims is not None):
            raise ValueError("claims must be set iff the token is valid")

    @classmethod
    def ok(cls, claims: Claims) -> ValidationResult:
        return cls(True, auth_pb2.VALIDATION_FAILURE_UNSPECIFIED, claims)

    @classmethod
    def fail(cls, reason: int) -> ValidationResult:
        cached = _FAILURES.get(reason)
        return cached if cached is not None else cls(False, reason, None)

    @property
    def reason_name(self) -> str:
        """The enum name, e.g. "EXPIRED" ("VALIDATION_FAILURE_UNSPECIFIED" when valid)."""
        try:
            return str(auth_pb2.ValidationFailure.Name(self.reason))
        except ValueError:
            return f"UNKNOWN_REASON_{self.reason}"

    def to_proto(self) -> auth_pb2.ValidateTokenResponse:
        if self.claims is None:
            return auth_pb2.ValidateTokenResponse(valid=False, reason=self.reason)  # type: ignore[arg-type]
        return auth_pb2.ValidateTokenResponse(valid=True, claims=self.claims.to_proto())

    @classmethod
    def from_proto(cls, msg: auth_pb2.ValidateTokenResponse) -> ValidationResult:
        """Read a server answer, failing closed on one that breaks the invariant."""
        if msg.valid:
            if not msg.HasField("claims"):
                return cls.fail(auth_pb2.MALFORMED)
            return cls.ok(Claims.from_proto(msg.claims))
        reason = int(msg.reason)
        if reason == auth_pb2.VALIDATION_FAILURE_UNSPECIFIED:
            reason = auth_pb2.MALFORMED
        return cls.fail(reason)


_FAILURES: dict[int, ValidationResult] = {
    value: ValidationResult(False, value, None)
    for value in auth_pb2.ValidationFailure.values()
    if value != auth_pb2.VALIDATION_FAILURE_UNSPECIFIED
}


def valid_result(
    issuer: str,
    subject: str,
    audience: str,
    scopes: tuple[str, ...],
    issued_at: int,
    not_before: int,
    expires_at: int,
    jti: str,
    key_id: str,
    client_id: str,
    cert_thumbprint: str = "",
    actors: tuple[str, ...] = (),
) -> ValidationResult:
    """ValidationResult.ok(Claims(...)) for claims the verifier has already checked.

    Plain construction: the verifier builds one result per token it verifies in full, and a
    cached verify returns that same object, so the frozen dataclasses' __init__ (about 1 µs of
    CPU more than filling the slots and switching __class__, as this once did) is paid once
    per token, on the ~30 µs cold path, and never on the cached one.
    """
    return ValidationResult(
        True,
        auth_pb2.VALIDATION_FAILURE_UNSPECIFIED,
        Claims(
            issuer,
            subject,
            audience,
            scopes,
            issued_at,
            not_before,
            expires_at,
            jti,
            key_id,
            client_id,
            cert_thumbprint,
            actors,
        ),
    )
