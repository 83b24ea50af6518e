"""Signing-key lifecycle: generate, activate, retire, revoke, prune.

States: next -> active -> retired -> (deleted once its last token has expired), or revoked at
once on compromise. Races between replicas are settled by storage (Dex rotation.go): the new key
is generated outside the transaction, and the transaction re-checks which key is active; losing
the race ("already rotated") is a normal outcome, not an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import rsa

from authsvc.clock import Clock, to_datetime, to_timestamp
from authsvc.crypto.kek import KekRing, KeyEncryptionKey, load_private_key, serialize_private_key
from authsvc.keys.jwks import jwk_thumbprint, public_jwk
from authsvc.keys.wrapping import wrapping_kek
from authsvc.storage.records import SigningKeyRecord
from authsvc.storage.repository import KekChanged, Repository

# Attempts at a rotation when `authsvc kek rotate` commits between wrapping and activating.
_KEK_ATTEMPTS = 2


@dataclass(frozen=True)
class RotationResult:
    key: SigningKeyRecord
    # False when another replica rotated first and its key is the one now active.
    rotated_here: bool


class KeyManager:
    """Changes signing-key state; the rotator decides when, storage decides who wins."""

    def __init__(
        self,
        repo: Repository,
        kek: KeyEncryptionKey | KekRing,
        clock: Clock,
        *,
        rsa_key_bits: int = 2048,
        max_ttl_seconds: int = 3600,
        leeway_seconds: int = 30,
    ) -> None:
        if rsa_key_bits < 2048:
            raise ValueError("RSA signing keys must be at least 2048 bits")
        self._repo = repo
        self._keks = kek if isinstance(kek, KekRing) else KekRing(kek)
        self._clock = clock
        self._bits = rsa_key_bits
        # A retired key stays published until every token it signed has expired.
        self._publish_after_retire = max_ttl_seconds + leeway_seconds
        self._leeway = leeway_seconds

    def _generate(self) -> SigningKeyRecord:
        private = rsa.generate_private_key(public_exponent=65537, key_size=self._bits)
        kid = jwk_thumbprint(private.public_key())
        now = to_datetime(self._clock.now())
        kek = wrapping_kek(self._repo, self._keks)
        return SigningKeyRecord(
            kid=kid,
            state="active",
            created_at=now,
            activated_at=None,
            retired_at=None,
            publish_until=None,
            public_jwk=json.dumps(public_jwk(private.public_key(), kid), separators=(",", ":")),
            private_key_enc=kek.wrap(serialize_private_key(private), kid=kid),
            kek_id=kek.kek_id,
        )

    def _activate(
        self, expected_active_kid: str | None, *, revoke_previous: bool
    ) -> RotationResult:
        for attempt in range(_KEK_ATTEMPTS):
            record = self._generate()
            now = self._clock.now()
            try:
                won = self._repo.create_signing_key(
                    record,
                    to_datetime(now),
                    expected_active_kid=expected_active_kid,
                    publish_until=to_datetime(now + self._publish_after_retire),
                    revoke_others=revoke_previous,
                )
                break
            except KekChanged:
                if attempt + 1 == _KEK_ATTEMPTS:
                    raise
        active = self._repo.fetch_active_signing_key()
        if active is None:  # pragma: no cover - the transaction above guarantees one
            raise RuntimeError("no active signing key after rotation")
        return RotationResult(key=active, rotated_here=won and active.kid == record.kid)

    def ensure_active(self) -> SigningKeyRecord:
        """Create the first key if there is none; whoever races, exactly one becomes active."""
        active = self._repo.fetch_active_signing_key()
        if active is not None:
            return active
        return self._activate(None, revoke_previous=False).key

    def rotate(self, *, revoke_previous: bool = False) -> RotationResult:
        """Rotate now (on demand). If another replica rotates at the same moment, one key wins."""
        current = self._repo.fetch_active_signing_key()
        return self._activate(
            current.kid if current is not None else None, revoke_previous=revoke_previous
        )

    def rotate_if_due(self, interval_seconds: int) -> RotationResult | None:
        """Scheduled rotation: only when the active key is older than the interval."""
        if interval_seconds <= 0:
            return None
        current = self._repo.fetch_active_signing_key()
        if current is None:
            return self._activate(None, revoke_previous=False)
        activated = current.activated_at or current.created_at
        age = self._clock.now() - to_timestamp(activated)
        # Activated further in the future than the leeway: stamped by a clock that ran ahead
        # and was stepped back. Its age is unknown, and waiting for that moment would put off
        # rotation by the whole step (authsvc.clock): it is due now.
        if -self._leeway <= age < interval_seconds:
            return None
        return self._activate(current.kid, revoke_previous=False)

    def prune(self) -> int:
        """Drop retired and revoked keys whose every token has expired."""
        return self._repo.prune_signing_keys(to_datetime(self._clock.now()))

    def private_key(self, record: SigningKeyRecord) -> rsa.RSAPrivateKey:
        """Unwrap a key's private part; DecryptError (opaque) on a wrong KEK or tampering."""
        if record.private_key_enc is None:
            raise ValueError("this key has no private part (retired or revoked)")
        der = self._keks.unwrap(record.private_key_enc, kid=record.kid, kek_id=record.kek_id)
        return load_private_key(der)
