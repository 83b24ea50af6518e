"""The only reader of clocks; everything else takes a Clock so tests can move time.

The server follows the wall clock as it is, steps included (SPIRE, Vault, Hydra and Keycloak do
the same). A server that refused to go back after an NTP correction would go on stamping `iat`
and `nbf` ahead of every other validator in the fleet (NOT_YET_VALID everywhere) until someone
restarted it, and replicas of one deployment would disagree. What a clock that never went back
was meant to protect is protected by state and margins instead, each where it is decided:

- an expired token: `exp` is compared to the wall clock. After a step back by D, a token this
  server stamped while it ran ahead by D may validate again: by the true time it has not
  expired, and every correct validator in the fleet already agrees. Its lifetime is bounded by
  max TTL + D of real time, the price of the wrong clock, not of following the right one.
- a revoked token: a revocation is kept (storage and each replica's set) until max TTL +
  leeway after the token's `exp`, and the pruner reads `earliest_now()` (the lower of the wall
  clock and the process's start time plus elapsed monotonic time): a wrong forward jump while
  the process runs prunes nothing early, and one it started with is covered up to max TTL. The
  verified-token cache re-checks `exp` and `nbf` on each use, so it follows the same clock.
- a retired key: its state never goes back to active, and once a replica has seen its
  publication end it does not publish it again (authsvc.sync.ServerState), whatever the clock
  says later; the next maintenance round deletes it from storage.
- a secret's grace period: once seen ended, the previous secret's row is deleted
  (Repository.end_secret_graces, run every sync interval), so a later step back cannot revive it.
  A step back during the grace period lengthens it by the step (bounded, as for tokens).
- the rotation schedule: a step forward brings a rotation early (harmless). After a step back,
  an active key stamped as activated further in the future than the leeway is due at once
  (authsvc.keys.rotator, which treats a `next` key's publication stamp alike): waiting for
  that moment would put off rotation by the whole step.
- failed-login windows: a step back keeps a window open longer (stricter); a step forward ends
  one early, once per step.
Steps are noticed by comparing wall-clock deltas to monotonic deltas between readings (WallClock),
logged at WARNING and counted; time itself is never altered.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

log = logging.getLogger("authsvc.clock")


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch (UTC), with sub-second precision."""
        ...

    def sleep(self, seconds: float) -> None: ...


@runtime_checkable
class Elapsed(Protocol):
    """A clock that also tells the time that really passed (tests' FakeClock), so a step of its
    wall reading can be told from time passing."""

    def monotonic(self) -> float: ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class WallClock:
    """The server's time: the wall clock unchanged, with its steps noticed.

    A step is a change of the wall clock between two readings that differs from the monotonic
    time elapsed by at least `threshold` seconds. It is logged at WARNING and passed to
    `on_step(direction, seconds)` ("back" or "forward"). Only steps between two readings are
    seen; the server reads its clock at least every sync interval.
    """

    def __init__(
        self,
        wall: Clock,
        *,
        threshold: float = 1.0,
        on_step: Callable[[str, float], None] | None = None,
    ) -> None:
        self._wall = wall
        self._monotonic: Callable[[], float] = (
            wall.monotonic if isinstance(wall, Elapsed) else time.monotonic
        )
        self._threshold = threshold
        self.on_step = on_step
        self._lock = threading.Lock()
        self._start_mono = self._monotonic()
        self._start_wall = wall.now()
        self._last = (self._start_wall, self._start_mono)

    def now(self) -> float:
        before = self._monotonic()
        wall = self._wall.now()
        after = self._monotonic()
        if after - before >= self._threshold / 2:
            # Descheduled between the readings (a loaded machine): the pair would look like a
            # step. Not compared, not kept.
            return wall
        with self._lock:
            last_wall, last_mono = self._last
            step = (wall - last_wall) - (before - last_mono)
            if before >= last_mono:
                self._last = (wall, before)
            else:  # two threads read in one order and locked in the other: keep the later one
                step = 0.0
        if abs(step) >= self._threshold:
            direction = "back" if step < 0 else "forward"
            log.warning(
                "wall clock stepped %s by %.1f s: authsvc follows it (times are stamped and "
                "checked by the wall clock; pruning waits for the later of the two)",
                direction,
                abs(step),
            )
            if self.on_step is not None:
                self.on_step(direction, abs(step))
        return wall

    def earliest_now(self) -> float:
        """The lower of the wall clock and start time plus monotonic time elapsed.

        For deleting what has expired (revocations, keys, audit rows): a wrong forward jump of
        the wall clock must not delete what the corrected clock still needs.
        """
        now = self.now()
        return min(now, self._start_wall + (self._monotonic() - self._start_mono))

    def sleep(self, seconds: float) -> None:
        self._wall.sleep(seconds)


def to_datetime(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


def to_timestamp(dt: datetime) -> float:
    """Seconds since the epoch; naive datetimes (SQLite returns them) are taken as UTC."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()
