"""Service secrets: minting with a recognisable prefix, keyed hashing and constant-time checks."""

from __future__ import annotations

import hashlib
import hmac
import secrets

__all__ = ["SECRET_PREFIX", "SecretHasher", "mint_secret"]

# Recognisable in logs, configs and secret scanners; not part of the entropy.
SECRET_PREFIX = "asvcs_"  # noqa: S105 (a prefix, not a secret)
_SECRET_BYTES = 32  # 256 bits


def mint_secret() -> str:
    """A new service secret: the prefix and 256 random bits from `secrets`, base64url."""
    return SECRET_PREFIX + secrets.token_urlsafe(_SECRET_BYTES)


class SecretHasher:
    """HMAC-SHA256 under a server-held key: 32 random bytes stored wrapped under the KEK
    (authsvc.keys.wrapping), so the KEK can rotate without invalidating a single hash.

    Secrets carry 256 random bits, so a keyed hash without salt or stretching is enough: one
    hash per secret, and a stolen database alone cannot even test a guess.
    """

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        """Key with the deployment's secret-hash key (authsvc.keys.wrapping.load_secret_hash_key).

        Raises:
            ValueError: key shorter than 32 bytes.
        """
        if not isinstance(key, bytes) or len(key) < 32:
            raise ValueError("the secret-hash key must be at least 32 bytes")
        self._key = key

    def __repr__(self) -> str:
        return "SecretHasher(<redacted>)"

    def hash(self, secret: str) -> bytes:
        return hmac.new(self._key, _encode(secret), hashlib.sha256).digest()

    def verify(self, secret: str, stored: bytes) -> bool:
        """Constant-time comparison of the secret's hash with a stored one."""
        return hmac.compare_digest(self.hash(secret), stored)


def _encode(secret: str) -> bytes:
    # surrogatepass: a malformed string from a caller must give a non-matching hash, not raise.
    return secret.encode("utf-8", "surrogatepass")
