"""Rotating a service's secret: one implementation for the RPC and the CLI.

Registering, changing, disabling and enabling services live in `authsvc.usecases.services`.
"""

from __future__ import annotations

from datetime import datetime

from authsvc.clock import Clock, to_datetime
from authsvc.crypto.secrets import SecretHasher, mint_secret
from authsvc.storage.repository import Repository


def rotate_service_secret(
    repo: Repository,
    hasher: SecretHasher,
    clock: Clock,
    service_id: str,
    grace_seconds: int,
    *,
    expected_current_hash: bytes | None = None,
) -> tuple[str, datetime | None]:
    """Give a service a new secret; the previous one works for `grace_seconds` more (0: ends now).

    `expected_current_hash` (self-rotation): the hash the caller logged in with, re-checked in
    the write's own transaction so that a rotation committed since that login wins.

    Returns the new secret (shown once, stored only hashed) and when the previous one stops.

    Raises:
        FailedPrecondition: `expected_current_hash` is no longer the current secret.
    """
    now = clock.now()
    secret = mint_secret()
    previous_until = to_datetime(now + grace_seconds) if grace_seconds > 0 else None
    repo.update_service_secret(
        service_id,
        hasher.hash(secret),
        to_datetime(now),
        previous_until,
        expected_current_hash=expected_current_hash,
    )
    return secret, previous_until
