"""Shared values for the storage suite: a fixed clock origin and signing-key records."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from authsvc.storage.records import SigningKeyRecord

T0 = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    """T0 plus `seconds`."""
    return T0 + timedelta(seconds=seconds)


def key_record(kid: str, created_at: datetime = T0) -> SigningKeyRecord:
    """A key as the manager hands it to storage (state is set by create_signing_key)."""
    return SigningKeyRecord(
        kid=kid,
        state="next",
        created_at=created_at,
        activated_at=None,
        retired_at=None,
        publish_until=None,
        public_jwk=f'{{"kty":"RSA","kid":"{kid}","n":"AQAB","e":"AQAB"}}',
        private_key_enc=f"wrapped-private-{kid}".encode(),
    )
