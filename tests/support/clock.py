"""A server Clock (authsvc.clock.Clock) that moves only when a test moves it."""

from __future__ import annotations

START = 1_900_000_000.0


class FakeClock:
    """Wall time `t` and the time that passed (`monotonic()`), which differ only by steps."""

    def __init__(self, now: float = START) -> None:
        self.t = now
        self._elapsed = 0.0

    def now(self) -> float:
        return self.t

    def monotonic(self) -> float:
        return self._elapsed

    def sleep(self, seconds: float) -> None:
        # Sleeping is time passing: code that waits for a moment (revoke-by-service) gets there.
        self.advance(max(0.0, seconds))

    def advance(self, seconds: float) -> None:
        """Let time pass; a negative amount cannot pass, so it is a step back (see step())."""
        if seconds < 0:
            self.step(seconds)
            return
        self.t += seconds
        self._elapsed += seconds

    def step(self, seconds: float) -> None:
        """Step the wall clock (an NTP correction, an operator): no time passes."""
        self.t += seconds
