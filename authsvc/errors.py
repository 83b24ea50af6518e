"""The server's error tree: each error a user can see carries its gRPC status code.

Only the servicer turns these into a status; messages never hold a secret or a token.
"""

from __future__ import annotations

import grpc


class AuthsvcError(Exception):
    """Root of every error the server raises on purpose."""

    grpc_code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(AuthsvcError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(AuthsvcError):
    grpc_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(AuthsvcError):
    grpc_code = grpc.StatusCode.PERMISSION_DENIED


class NotFound(AuthsvcError):
    grpc_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(AuthsvcError):
    grpc_code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhausted(AuthsvcError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        # Seconds the caller should wait; sent as `retry-after` trailing metadata.
        self.retry_after = retry_after


class FailedPrecondition(AuthsvcError):
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION


class StorageUnavailable(AuthsvcError):
    """The database could not be reached or answered with a transient error."""

    grpc_code = grpc.StatusCode.UNAVAILABLE


class ConfigError(AuthsvcError):
    """Configuration is missing or unsafe; names the setting, never its value."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION


class DecryptError(AuthsvcError):
    """A wrapped private key could not be decrypted (wrong KEK or tampered data).

    Deliberately opaque, like Fernet's InvalidToken.
    """

    grpc_code = grpc.StatusCode.INTERNAL

    def __init__(self) -> None:
        super().__init__("decryption failed")
