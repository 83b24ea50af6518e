"""Housekeeping: what the scheduler deletes once it can no longer matter.

Each window is a rule about time that other rules depend on (throttling counts failures within
its window; a known peer is forgotten after its period; audit rows are kept for their
retention), so they live here and not in the scheduler loop that merely calls `prune`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from authsvc.clock import Clock, to_datetime
from authsvc.config import Settings
from authsvc.storage.repository import Repository


@dataclass(frozen=True)
class Pruned:
    """How many rows each kind of housekeeping removed (for logs and tests)."""

    auth_failures: int
    known_peers: int
    audit_events: int
    used_assertions: int = 0


class Housekeeping:
    def __init__(
        self,
        repo: Repository,
        clock: Clock,
        settings: Settings,
        *,
        earliest_now: Callable[[], float] | None = None,
    ) -> None:
        """`earliest_now`: the server's `WallClock.earliest_now` (the wall clock, held back by
        elapsed monotonic time after a forward jump); the plain clock when not given."""
        self._repo = repo
        self._clock = clock
        self._s = settings
        self._earliest_now = earliest_now or clock.now

    def prune(self) -> Pruned:
        """Delete failure counts older than the throttle window, known peers past
        `throttle_known_peer_seconds` (0 keeps them), audit rows past their retention, and the
        jti of assertions that have expired.

        Audit retention is counted from the earlier of the wall clock and elapsed monotonic
        time (`WallClock.earliest_now`): a wrong forward jump of the clock must not delete audit
        rows early.
        """
        now = self._clock.now()
        failures = self._repo.prune_auth_failures(
            to_datetime(now - self._s.throttle_window_seconds)
        )
        peers = 0
        if self._s.throttle_known_peer_seconds > 0:
            peers = self._repo.prune_known_peers(
                to_datetime(now - self._s.throttle_known_peer_seconds)
            )
        keep_from = self._earliest_now() - self._s.audit_retention_days * 86400
        audit = self._repo.prune_audit_events(to_datetime(keep_from))
        # A used assertion's jti is kept until its assertion can no longer verify; by the
        # earlier clock too, so that a wrong forward jump, once corrected, cannot reopen it.
        used = self._repo.prune_used_assertions(to_datetime(self._earliest_now()))
        return Pruned(
            auth_failures=failures, known_peers=peers, audit_events=audit, used_assertions=used
        )
