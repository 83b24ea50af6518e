"""Domain errors -> gRPC status: the one table, used by every RPC (unary and streaming)."""

from __future__ import annotations

import grpc

from authsvc.errors import (
    AlreadyExists,
    AuthsvcError,
    ConfigError,
    DecryptError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    StorageUnavailable,
    Unauthenticated,
)

_CODES: dict[type[AuthsvcError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    StorageUnavailable: grpc.StatusCode.UNAVAILABLE,
    ConfigError: grpc.StatusCode.FAILED_PRECONDITION,
    DecryptError: grpc.StatusCode.INTERNAL,
}


def status_of(exc: AuthsvcError) -> grpc.StatusCode:
    """The status for an error, by its nearest mapped class (a subclass inherits its code)."""
    for cls in type(exc).__mro__:
        code = _CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def trailers_of(exc: AuthsvcError) -> tuple[tuple[str, str], ...]:
    """Trailing metadata an error carries: `retry-after` for a throttle."""
    if isinstance(exc, ResourceExhausted):
        return (("retry-after", str(exc.retry_after)),)
    return ()
