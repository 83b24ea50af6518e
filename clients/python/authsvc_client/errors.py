"""The client's error tree: one root, and one TokenInvalid subclass per ValidationFailure reason."""

from __future__ import annotations

from typing import ClassVar

import grpc

from authsvc_client.v1 import auth_pb2

__all__ = [
    "AuthsvcClientError",
    "BadSignature",
    "CertificateMismatch",
    "Expired",
    "InsufficientScope",
    "Malformed",
    "NotYetValid",
    "Revoked",
    "ServiceDisabled",
    "TokenInvalid",
    "UnknownKey",
    "WrongAudience",
    "WrongIssuer",
    "error_for_reason",
]


class AuthsvcClientError(Exception):
    """Root of every error the client package raises on purpose."""


class TokenInvalid(AuthsvcClientError):
    """A token failed validation; `reason` is its auth_pb2.ValidationFailure value.

    Messages are fixed per class and never contain any part of the token. The base class
    stands for MALFORMED so that an unspecific failure still fails closed.
    """

    reason: ClassVar[int] = auth_pb2.MALFORMED
    default_message: ClassVar[str] = "token is invalid"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.default_message)


class Malformed(TokenInvalid):
    reason = auth_pb2.MALFORMED
    default_message = "token is malformed"


class BadSignature(TokenInvalid):
    reason = auth_pb2.BAD_SIGNATURE
    default_message = "token signature or algorithm is not acceptable"


class UnknownKey(TokenInvalid):
    reason = auth_pb2.UNKNOWN_KEY
    default_message = "token is signed by an unknown key"


class Expired(TokenInvalid):
    reason = auth_pb2.EXPIRED
    default_message = "token has expired"


class NotYetValid(TokenInvalid):
    reason = auth_pb2.NOT_YET_VALID
    default_message = "token is not valid yet"


class WrongIssuer(TokenInvalid):
    reason = auth_pb2.WRONG_ISSUER
    default_message = "token has the wrong issuer"


class WrongAudience(TokenInvalid):
    reason = auth_pb2.WRONG_AUDIENCE
    default_message = "token is for another audience"


class Revoked(TokenInvalid):
    reason = auth_pb2.REVOKED
    default_message = "token has been revoked"


class InsufficientScope(TokenInvalid):
    reason = auth_pb2.INSUFFICIENT_SCOPE
    default_message = "token lacks a required scope"


class ServiceDisabled(TokenInvalid):
    reason = auth_pb2.SERVICE_DISABLED
    default_message = "token subject is disabled"


class CertificateMismatch(TokenInvalid):
    reason = auth_pb2.CERTIFICATE_MISMATCH
    default_message = "token is bound to another client certificate (or none was presented)"


_BY_REASON: dict[int, type[TokenInvalid]] = {
    cls.reason: cls
    for cls in (
        Malformed,
        BadSignature,
        UnknownKey,
        Expired,
        NotYetValid,
        WrongIssuer,
        WrongAudience,
        Revoked,
        InsufficientScope,
        ServiceDisabled,
        CertificateMismatch,
    )
}


def error_for_reason(reason: int) -> type[TokenInvalid]:
    """The TokenInvalid subclass for a ValidationFailure value (unknown values: Malformed)."""
    return _BY_REASON.get(reason, Malformed)


# --- runtime errors of token sources and validators (tokens.py, validation.py) ---------------


class CredentialsError(AuthsvcClientError):
    """The service's own credentials are missing or unsafe (names the variable, never the value)."""


class TokenUnavailable(AuthsvcClientError):
    """No access token could be obtained; `code` is the IssueToken status when there was one."""

    code: object = None


class ValidatorUnavailable(AuthsvcClientError):
    """A token could not be checked (authsvc down or slow, key set or revocation feed stale).

    Interceptors answer UNAVAILABLE: a validator that cannot decide never allows.
    """

__all__ += ["CredentialsError", "TokenUnavailable", "ValidatorUnavailable"]


class TokenRefused(TokenUnavailable):
    """authsvc said no (audience or scope not allowed, wrong secret, disabled service): a
    caller mistake, not an outage; retrying will not help until an admin changes the grant."""


__all__ += ["TokenRefused"]


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The status code of a failed call, sync or grpc.aio, UNKNOWN when it has none.

    grpc.aio's AioRpcError has code() without being a grpc.Call, so an isinstance check on
    grpc.Call loses every asyncio failure's status; this is the one place that reads it.
    """
    code_of = getattr(exc, "code", None)
    code = code_of() if callable(code_of) else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
