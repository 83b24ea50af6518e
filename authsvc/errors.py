"""The server's error tree: what a use case raises when a caller cannot have what it asked.

Free of gRPC: the servicer maps each class to a status code (`authsvc.server.status`), the
only place that does. Messages never hold a secret or a token.
"""

from __future__ import annotations


class AuthsvcError(Exception):
    """Root of every error the server raises on purpose."""


class InvalidArgument(AuthsvcError):
    """A malformed request: a field missing, too long or outside its grammar."""


class Unauthenticated(AuthsvcError):
    """The caller did not prove who it is (bad credentials, bad or missing bearer token)."""


class PermissionDenied(AuthsvcError):
    """The caller is known but may not do this (audience, scope, admin, current secret)."""


class NotFound(AuthsvcError):
    """The named service, key or issuer does not exist."""


class AlreadyExists(AuthsvcError):
    """A name that must be unique is taken."""


class ResourceExhausted(AuthsvcError):
    """Throttled or over a bound; the caller may retry after `retry_after` seconds."""

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        # Seconds the caller should wait; sent as `retry-after` trailing metadata.
        self.retry_after = retry_after


class FailedPrecondition(AuthsvcError):
    """The state does not allow this now (a concurrent change won, a key is missing)."""


class StorageUnavailable(AuthsvcError):
    """The database could not be reached or answered with a transient error."""


class ConfigError(AuthsvcError):
    """Configuration is missing or unsafe; names the setting, never its value."""


class DecryptError(AuthsvcError):
    """A wrapped private key could not be decrypted (wrong KEK or tampered data).

    Deliberately opaque, like Fernet's InvalidToken.
    """

    def __init__(self) -> None:
        super().__init__("decryption failed")
