"""A server Clock (authsvc.clock.Clock) that moves only when a test moves it."""

from __future__ import annotations

START = 1_900_000_000.0


class FakeClock:
    def __init__(self, now: float = START) -> None:
        self.t = now

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        # Sleeping is time passing: code that waits for a moment (revoke-by-service) gets there.
        self.t += max(0.0, seconds)

    def advance(self, seconds: float) -> None:
        self.t += seconds
