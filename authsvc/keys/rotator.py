"""When signing keys rotate (SPIRE's ca/rotator beside ca/manager): the policy, not the mechanism.

The key manager (authsvc.keys.manager) changes key state and keeps one `next` key published;
this module decides when a rotation is due and which key it activates:

- A scheduled rotation is due once the active key is older than the rotation interval. It
  activates the `next` key only once that key has been in the JWK Set for the publish lead
  (AUTHSVC_KEY_PUBLISH_LEAD_SECONDS): the JWKS cache lifetime of validators plus one sync
  interval (a replica shows a new key at its next sync; a validator that fetched just before
  that keeps its copy for a cache lifetime). A validator therefore never meets an unknown kid at
  a scheduled rotation. A `next` key not yet old enough puts the rotation off until it is.
- On demand (RotateSigningKey, `authsvc keys rotate`) activates the `next` key at once when it
  has been published for the lead, as it normally has (since the last rotation: days). A
  second rotation within the lead, or one that finds no `next` key and has to make it, is
  refused (FailedPrecondition, saying when it may run): activating a key validators may not
  hold yet would break DESIGN's promise that a planned rotation never meets an unknown kid,
  and an RPC cannot wait out the lead (generate-and-wait would only move the wait into the
  call). A retry of a rotation that did happen (its answer lost) is refused the same way,
  instead of rotating twice. Only a compromise rotation does not wait (below).
- A compromise rotation (`revoke_previous`) discards the pre-published `next` key too and
  activates a freshly generated one. The `next` key never signed, but its private part sits
  beside the active one's, wrapped under the same KEK, in the same database: whatever leaked
  the active key (the database with its KEK) leaked it as well. The fresh key's unknown kid
  makes validators refetch the JWK Set at once, which is also what drops the revoked keys
  from them before their next scheduled refresh.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from authsvc.clock import Clock, to_timestamp
from authsvc.errors import FailedPrecondition
from authsvc.keys.manager import KeyManager, RotationAudit, RotationResult
from authsvc.storage.records import SigningKeyRecord

if TYPE_CHECKING:
    from authsvc.config import Settings

__all__ = [
    "CLIENT_JWKS_REFRESH_SECONDS",
    "JWKS_MAX_AGE_CAP_SECONDS",
    "Rotator",
    "default_publish_lead",
    "jwks_max_age",
]

# LocalValidator's default `jwks_refresh_seconds` (authsvc_client.validation): how long an
# authsvc client keeps a JWK Set before it fetches it again (tests/unit/test_rotator.py keeps
# the two equal).
CLIENT_JWKS_REFRESH_SECONDS = 30.0
# The ceiling of /.well-known/jwks.json's Cache-Control max-age.
JWKS_MAX_AGE_CAP_SECONDS = 300


def jwks_max_age(rotation_interval_seconds: int) -> int:
    """How long an HTTP cache may keep /.well-known/jwks.json (Cache-Control max-age).

    A tenth of the rotation interval, capped at five minutes, so a retired key drops out of
    caches soon after its publication ends. A new key is published ahead of its activation by
    at least this long (default_publish_lead), and validators also refetch on an unknown kid.
    """
    if rotation_interval_seconds <= 0:
        return JWKS_MAX_AGE_CAP_SECONDS
    return max(1, min(JWKS_MAX_AGE_CAP_SECONDS, rotation_interval_seconds // 10))


def default_publish_lead(rotation_interval_seconds: int, sync_interval_seconds: float) -> float:
    """How long a `next` key is published before a scheduled rotation may activate it.

    The longest JWKS cache a validator may hold (an authsvc client's refresh period, or an HTTP
    cache honouring max-age), plus one sync interval for every replica to show the key.
    """
    cache = max(CLIENT_JWKS_REFRESH_SECONDS, float(jwks_max_age(rotation_interval_seconds)))
    return cache + sync_interval_seconds


@dataclass(frozen=True)
class Rotator:
    """The rotation schedule of one server, over the shared key manager."""

    manager: KeyManager
    clock: Clock
    interval_seconds: int
    publish_lead_seconds: float
    leeway_seconds: int = 30

    @classmethod
    def for_settings(cls, manager: KeyManager, clock: Clock, settings: Settings) -> Rotator:
        return cls(
            manager=manager,
            clock=clock,
            interval_seconds=settings.key_rotation_interval_seconds,
            publish_lead_seconds=settings.publish_lead_seconds,
            leeway_seconds=settings.leeway_seconds,
        )

    def _age(self, stamped: float) -> float | None:
        """Seconds since `stamped`, or None when it lies further ahead than the leeway: stamped
        by a clock that ran ahead and was stepped back (authsvc.clock). Its age is unknown, and
        waiting for that moment would put things off by the whole step: callers treat it as
        old enough."""
        age = self.clock.now() - stamped
        return None if age < -self.leeway_seconds else age

    def is_due(self, active: SigningKeyRecord) -> bool:
        """Scheduled rotation is on and the active key is older than the interval."""
        if self.interval_seconds <= 0:
            return False
        age = self._age(to_timestamp(active.activated_at or active.created_at))
        return age is None or age >= self.interval_seconds

    def is_published_long_enough(self, next_key: SigningKeyRecord) -> bool:
        """The `next` key has been in the JWK Set for the publish lead (every validator's
        cached copy holds it by now)."""
        return self.publish_wait(next_key) <= 0

    def publish_wait(self, next_key: SigningKeyRecord) -> float:
        """Seconds until the `next` key has been published for the lead (0 or less: it has)."""
        age = self._age(to_timestamp(next_key.created_at))
        return 0.0 if age is None else self.publish_lead_seconds - age

    def rotate_if_due(self, *, audit: RotationAudit | None = None) -> RotationResult | None:
        """Scheduled: activate the `next` key when the active key is due and the `next` key has
        been published for the lead; None when nothing was due or ready (or the `next` key was
        revoked under us: the compromise rotation that did it already rotated). `audit(kid)`:
        the row the activating transaction writes (KeyManager.activate_next)."""
        active = self.manager.active_key()
        if active is None:
            return self.manager.activate_fresh(None, revoke_previous=False, audit=audit)
        if not self.is_due(active):
            return None
        next_key = self.manager.ensure_next()
        if not self.is_published_long_enough(next_key):
            return None
        return self.manager.activate_next(next_key, active.kid, audit=audit)

    def rotate_now(
        self, *, revoke_previous: bool = False, audit: RotationAudit | None = None
    ) -> RotationResult:
        """On demand: the `next` key becomes active at once, once it has been published for
        the lead; with `revoke_previous`, a fresh key instead and every other key, the `next`
        one included, is revoked at once. `audit(kid)`: the row the activating transaction
        writes, should this call win (RotationResult.audited).

        Raises:
            FailedPrecondition: the `next` key is younger than the lead (see the module text).
        """
        active = self.manager.active_key()
        expected = active.kid if active is not None else None
        if revoke_previous or active is None:
            return self.manager.activate_fresh(
                expected, revoke_previous=revoke_previous, audit=audit
            )
        next_key = self.manager.ensure_next()
        wait = self.publish_wait(next_key)
        if wait > 0:
            raise FailedPrecondition(
                f"the next signing key has been published for less than the publish lead "
                f"({self.publish_lead_seconds:g} s, AUTHSVC_KEY_PUBLISH_LEAD_SECONDS), so "
                f"validators may not hold it yet; it can become active in {math.ceil(wait)} s "
                "(a suspected compromise: rotate with revoke_previous, which does not wait)"
            )
        result = self.manager.activate_next(next_key, expected, audit=audit)
        if result is None:
            # Revoked between our read and our write: a compromise rotation just ran, which is
            # a rotation this call lost the race to.
            current = self.manager.active_key()
            if current is None:  # pragma: no cover - a rotation leaves one active key
                raise RuntimeError("no active signing key after rotation")
            return RotationResult(key=current, rotated_here=False)
        return result
