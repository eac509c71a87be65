"""Test doubles shared by every test folder (one of each: a copy per file drifts)."""

from __future__ import annotations

__all__ = ["FakeClock"]


class FakeClock:
    """A clock the test moves by hand (``clock.now += 5``); pass it where code takes a
    ``clock: Callable[[], float]``."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
