"""Signing-key lifecycle: generate, activate, retire, revoke, prune.

States: next -> active -> retired -> (deleted once its last token has expired), or revoked at
once on compromise. A key is stored as `next` first, so it is in the JWK Set before it signs; a
rotation activates it. Races between replicas are settled by storage (Dex rotation.go): keys
are generated outside the transaction, and the transaction re-checks which key is active (and
that at most one `next` key exists); losing the race ("already rotated") is a normal outcome,
not an error.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from cryptography.hazmat.primitives.asymmetric import rsa

from authsvc.clock import Clock, to_datetime
from authsvc.crypto.kek import KekRing, KeyEncryptionKey, load_private_key, serialize_private_key
from authsvc.errors import AuthsvcError, ConfigError
from authsvc.keys.jwks import jwk_thumbprint, public_jwk
from authsvc.keys.wrapping import NOT_HELD, wrapping_kek
from authsvc.storage.records import KeyState, SigningKeyRecord
from authsvc.storage.repository import AuditEvent, KekChanged, Repository

log = logging.getLogger("authsvc.server")

# Attempts at a rotation when `authsvc kek rotate` commits between wrapping and activating.
_KEK_ATTEMPTS = 2

# The audit row of a rotation that activates the key with this kid (RotationAudit(kid)),
# written in the transaction that activates it.
RotationAudit = Callable[[str], AuditEvent]


@dataclass(frozen=True)
class RotationResult:
    key: SigningKeyRecord
    # False when another replica rotated first and its key is the one now active.
    rotated_here: bool
    # The audit row this rotation's transaction wrote with the activation (from the `audit`
    # argument); None when it wrote none (another replica won, or no `audit` was given).
    audited: AuditEvent | None = None


class KeyManager:
    """Changes signing-key state; the rotator (authsvc.keys.rotator) decides when, storage
    decides who wins. Keeps exactly one `next` key: made at start if missing and again each
    time one is activated."""

    def __init__(
        self,
        repo: Repository,
        kek: KeyEncryptionKey | KekRing,
        clock: Clock,
        *,
        rsa_key_bits: int = 2048,
        max_ttl_seconds: int = 3600,
        leeway_seconds: int = 30,
        sync_interval_seconds: float = 0.0,
    ) -> None:
        """`sync_interval_seconds`: how long another replica may go on signing with a key
        retired here, until its next sync shows it the rotation."""
        if rsa_key_bits < 2048:
            raise ValueError("RSA signing keys must be at least 2048 bits")
        self._repo = repo
        self._keks = kek if isinstance(kek, KekRing) else KekRing(kek)
        self._clock = clock
        self._bits = rsa_key_bits
        # A retired key stays published until every token it signed has expired: the last
        # one may come from a replica that has not synced yet (DESIGN: older keys stay
        # published until every token they signed has expired).
        self._publish_after_retire = (
            max_ttl_seconds + leeway_seconds + math.ceil(sync_interval_seconds)
        )

    def _generate(self, state: KeyState) -> SigningKeyRecord:
        private = rsa.generate_private_key(public_exponent=65537, key_size=self._bits)
        kid = jwk_thumbprint(private.public_key())
        now = to_datetime(self._clock.now())
        kek = wrapping_kek(self._repo, self._keks)
        return SigningKeyRecord(
            kid=kid,
            state=state,
            created_at=now,
            activated_at=None,
            retired_at=None,
            publish_until=None,
            public_jwk=json.dumps(public_jwk(private.public_key(), kid), separators=(",", ":")),
            private_key_enc=kek.wrap(serialize_private_key(private), kid=kid),
            kek_id=kek.kek_id,
        )

    def _retire_until(self, now: float) -> datetime:
        return to_datetime(now + self._publish_after_retire)

    def _result(self, kid: str, won: bool, audited: AuditEvent | None) -> RotationResult:
        active = self._repo.fetch_active_signing_key()
        if active is None:  # pragma: no cover - the transaction above guarantees one
            raise RuntimeError("no active signing key after rotation")
        return RotationResult(
            key=active, rotated_here=won and active.kid == kid, audited=audited if won else None
        )

    def activate_fresh(
        self,
        expected_active_kid: str | None,
        *,
        revoke_previous: bool,
        audit: RotationAudit | None = None,
    ) -> RotationResult:
        """Generate a key and make it active in one step: it was never published before.

        For the very first key (nothing to publish it ahead of) and for a compromise rotation
        (`revoke_previous`, which also revokes the pre-published `next` key: see
        authsvc.keys.rotator). A `next` key is prepared afterwards. `audit(kid)`: the row
        written in the activating transaction, if this call wins (RotationResult.audited).
        """
        for attempt in range(_KEK_ATTEMPTS):
            record = self._generate("active")
            event = None if audit is None else audit(record.kid)
            now = self._clock.now()
            try:
                won = self._repo.create_signing_key(
                    record,
                    to_datetime(now),
                    expected_active_kid=expected_active_kid,
                    publish_until=self._retire_until(now),
                    revoke_others=revoke_previous,
                    audit=event,
                )
                break
            except KekChanged:
                if attempt + 1 == _KEK_ATTEMPTS:
                    raise
        result = self._result(record.kid, won, event)
        self._prepare_next()
        return result

    def activate_next(
        self,
        next_key: SigningKeyRecord,
        expected_active_kid: str | None,
        *,
        audit: RotationAudit | None = None,
    ) -> RotationResult | None:
        """Make the published `next_key` active, retire the active one, prepare a new `next`.

        None when `next_key` is no longer a `next` key (a compromise rotation revoked it
        meanwhile); losing the race to another replica is a RotationResult with
        rotated_here=False. `audit(kid)`: as for activate_fresh.

        Raises:
            ConfigError: `next_key` is wrapped under a KEK this process does not hold (a
                replica left on the old KEK after `authsvc kek rotate`): activating it would
                leave this replica unable to sign, so it leaves the rotation to the others.
        """
        if next_key.kek_id is not None and next_key.kek_id not in self._keks.kek_ids:
            raise ConfigError(NOT_HELD)
        event = None if audit is None else audit(next_key.kid)
        now = self._clock.now()
        outcome = self._repo.activate_next_signing_key(
            next_key.kid,
            to_datetime(now),
            expected_active_kid=expected_active_kid,
            publish_until=self._retire_until(now),
            audit=event,
        )
        if outcome == "no_next":
            return None
        result = self._result(next_key.kid, outcome == "activated", event)
        self._prepare_next()
        return result

    def _prepare_next(self) -> None:
        """The following `next` key, after a rotation that has committed: a failure here must
        not report the rotation as failed, and the next scheduled round prepares the key."""
        try:
            self.ensure_next()
        except AuthsvcError as exc:
            log.warning("rotated, but the next signing key is not prepared yet: %s", exc)

    def ensure_active(self) -> SigningKeyRecord:
        """At start: create the first key if there is none (whoever races, exactly one becomes
        active), and the `next` key if there is none."""
        active = self._repo.fetch_active_signing_key()
        if active is None:
            return self.activate_fresh(None, revoke_previous=False).key
        self.ensure_next()
        return active

    def ensure_next(self) -> SigningKeyRecord:
        """The one `next` key: the stored one, or a new one (whoever races, one is kept).

        It is published from the moment it is stored and signs nothing until a rotation
        activates it.
        """
        for attempt in range(_KEK_ATTEMPTS):
            existing = self.next_key()
            if existing is not None:
                return existing
            record = self._generate("next")
            try:
                self._repo.create_next_signing_key(record, to_datetime(self._clock.now()))
            except KekChanged:
                if attempt + 1 == _KEK_ATTEMPTS:
                    raise
        stored = self.next_key()
        if stored is None:  # pragma: no cover - created above or by the racer that won
            raise RuntimeError("no next signing key after creating one")
        return stored

    def active_key(self) -> SigningKeyRecord | None:
        return self._repo.fetch_active_signing_key()

    def next_key(self) -> SigningKeyRecord | None:
        """The oldest `next` key (there is one; several only in a database written by hand)."""
        keys = [k for k in self._repo.list_signing_keys() if k.state == "next"]
        return min(keys, key=lambda k: (k.created_at, k.kid)) if keys else None

    def prune(self, now: float | None = None) -> int:
        """Drop retired and revoked keys whose every token has expired by `now`: the server
        passes WallClock.earliest_now, so a wrong forward jump of the wall clock deletes
        nothing the corrected clock still needs (a retired key tokens still name)."""
        return self._repo.prune_signing_keys(to_datetime(self._clock.now() if now is None else now))

    def private_key(self, record: SigningKeyRecord) -> rsa.RSAPrivateKey:
        """Unwrap a key's private part; DecryptError (opaque) on a wrong KEK or tampering."""
        if record.private_key_enc is None:
            raise ValueError("this key has no private part (retired or revoked)")
        der = self._keks.unwrap(record.private_key_enc, kid=record.kid, kek_id=record.kek_id)
        return load_private_key(der)
