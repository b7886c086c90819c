"""The one fake clock of the test suite (seconds that move only when a test moves them),
and the sleeper that moves it in place of a real wait.

The engine takes its clock as a plain ``Callable[[], float]``: monotonic seconds for
:class:`~callpolicy.CallPolicy` (cooldowns, retry deadlines), its ``MemoryStore`` and
:class:`~callpolicy.Budget` (windows), wall-clock seconds (``time.time``) for
:class:`~callpolicy.ResponseCache` (creation and expiry times). A :class:`FakeClock` is that
callable; it serves as either kind, and :meth:`FakeClock.wall` starts one at a realistic
epoch time for the wall-clock uses.

>>> clock = FakeClock()
>>> clock()
1000.0
>>> clock.advance(2.5)
>>> clock()
1002.5
>>> clock.now = 0.0  # tests that model time themselves may set it outright
>>> clock()
0.0
>>> FakeClock.wall()()
1700000000.0
"""

from __future__ import annotations

__all__ = ["FakeClock", "FakeSleeper"]


class FakeClock:
    """Seconds (monotonic or wall clock alike) that move only when a test advances them.

    ``now`` is public: read it to know the time, assign it to jump to a time.
    """

    MONOTONIC_START = 1000.0
    """Where :class:`FakeClock` starts by default: any positive number will do."""

    WALL_START = 1_700_000_000.0
    """Where :meth:`wall` starts: a plausible ``time.time()`` (November 2023)."""

    def __init__(self, now: float = MONOTONIC_START) -> None:
        self.now = now

    @classmethod
    def wall(cls, now: float = WALL_START) -> FakeClock:
        """A clock standing in for ``time.time``: starts at a realistic epoch time."""
        return cls(now)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def __repr__(self) -> str:
        return f"FakeClock(now={self.now!r})"


class FakeSleeper:
    """A ``sleep``/``async_sleep`` pair that records each delay and advances the clock
    instead of waiting: retries run at once, on the clock they would have taken.

    >>> clock = FakeClock()
    >>> sleeper = FakeSleeper(clock)
    >>> sleeper(0.5)
    >>> (sleeper.delays, clock())
    ([0.5], 1000.5)
    """

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.delays: list[float] = []
        self.on_sleep: list[object] = []
        """Callables run (in order, one per sleep) during a sleep, to act mid-retry."""

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        self.clock.advance(seconds)
        if self.on_sleep:
            action = self.on_sleep.pop(0)
            if callable(action):
                action()

    async def asleep(self, seconds: float) -> None:
        self(seconds)
