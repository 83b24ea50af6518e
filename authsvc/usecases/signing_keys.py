"""Signing keys: rotate (on demand and on schedule), list, publish; one rule set for RPC, CLI and
scheduler.

The schedule itself is authsvc.keys.rotator's; the state changes are the key manager's. Here
every rotation is audited once, by whoever won the race between replicas, in the transaction
that activates the key (a failed audit write rotates nothing, so a retry rotates once): the
loser's audit row, on its own since it changed nothing, says `already_rotated` for an
on-demand call, and a scheduled round that lost writes none, so a fleet leaves one scheduled
row per rotation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from authsvc.clock import Clock, to_datetime
from authsvc.keys.manager import KeyManager, RotationResult
from authsvc.keys.rotator import Rotator
from authsvc.storage.records import SigningKeyRecord
from authsvc.storage.repository import AuditEvent, Repository
from authsvc.usecases.audit import SCHEDULER_ACTOR, AuditTrail, Origin

__all__ = ["ScheduledRound", "SigningKeys"]

log = logging.getLogger("authsvc.server")

ROTATE_ACTION = "rotate_signing_key"


@dataclass(frozen=True)
class ScheduledRound:
    """What one scheduled round did."""

    # The key a rotation made active on this replica, or None (not due, not ready, or another
    # replica rotated first).
    rotated: SigningKeyRecord | None
    keys_pruned: int
    revocations_pruned: int


class SigningKeys:
    """Signing-key use cases over one key manager and its schedule."""

    def __init__(
        self,
        repo: Repository,
        manager: KeyManager,
        rotator: Rotator,
        clock: Clock,
        *,
        published: Callable[[], str] | None = None,
    ) -> None:
        """`published`: the JWK Set this replica serves (ServerState.jwks_json), for jwks();
        None where nothing is served (the CLI)."""
        self._repo = repo
        self._manager = manager
        self._rotator = rotator
        self._trail = AuditTrail(repo, clock)
        self._published = published

    def rotate(self, origin: Origin, *, revoke_previous: bool = False) -> RotationResult:
        """Rotate now: the published `next` key becomes active (a fresh key with
        `revoke_previous`, every other key revoked at once); audited under `origin`.

        Losing the race to another replica is a normal outcome: the key that won is returned
        with rotated_here=False and the audit row says `already_rotated`.
        """
        detail = f"revoke_previous={revoke_previous}"

        def audit(kid: str) -> AuditEvent:
            return self._trail.event(
                origin, action=ROTATE_ACTION, target=f"key:{kid}", detail=detail
            )

        # The "ok" row is written by the transaction that activates the key, if this one does.
        result = self._rotator.rotate_now(revoke_previous=revoke_previous, audit=audit)
        if result.audited is not None:
            self._trail.log(result.audited)
        else:
            # Another replica rotated: nothing changed here, so the row stands on its own.
            self._trail.record(
                origin,
                action=ROTATE_ACTION,
                target=f"key:{result.key.kid}",
                outcome="already_rotated",
                detail=detail,
            )
        return result

    def list(self) -> list[SigningKeyRecord]:
        """Every key in every state (`next` included), newest first."""
        return self._repo.list_signing_keys()

    def jwks(self) -> str:
        """The JWK Set this replica publishes: the active and `next` keys and retired keys whose
        tokens may still live."""
        if self._published is None:
            raise RuntimeError("no JWK Set is published here (not a serving replica)")
        return self._published()

    def scheduled_round(
        self, revocation_horizon: float, prune_now: float | None = None
    ) -> ScheduledRound:
        """The scheduler's round: rotate if due (audited as SCHEDULER_ACTOR, by the replica
        that won only), make sure a `next` key is published, prune keys whose every token has
        expired by `prune_now` (the server's WallClock.earliest_now; None: the clock's now) and
        revocations of tokens that expired before `revocation_horizon`
        (ServerState.revocation_horizon)."""
        origin = Origin.local(SCHEDULER_ACTOR)

        def audit(kid: str) -> AuditEvent:
            return self._trail.event(
                origin, action=ROTATE_ACTION, target=f"key:{kid}", detail="scheduled"
            )

        # Written by the transaction that activates the key, on the replica whose transaction
        # does (RotationResult.audited): a replica that lost the race writes no row.
        result = self._rotator.rotate_if_due(audit=audit)
        rotated = None
        if result is not None and result.rotated_here:
            rotated = result.key
            log.info("scheduled key rotation: new active key %s", result.key.kid)
        if result is not None and result.audited is not None:
            self._trail.log(result.audited)
        # A `next` key revoked by a compromise rotation on another host, or a database from
        # before `next` keys: publish one now so the next rotation finds it old enough.
        self._manager.ensure_next()
        keys = self._manager.prune(prune_now)
        revocations = self._repo.prune_revocations(to_datetime(revocation_horizon))
        return ScheduledRound(rotated=rotated, keys_pruned=keys, revocations_pruned=revocations)
