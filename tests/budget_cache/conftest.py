"""Fixtures of the budget and cache suite: a clock that moves only when told.

No test here waits on real time: windows and TTLs pass by advancing :class:`FakeClock`.
"""

from __future__ import annotations

import pytest


class FakeClock:
    """Seconds (monotonic or wall clock alike) that move only when a test advances them."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
