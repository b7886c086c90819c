"""Fixtures of the budget and cache suite: a clock that moves only when told.

No test here waits on real time: windows and TTLs pass by advancing a
:class:`~tests.support.clock.FakeClock` that starts at a realistic wall-clock time.
"""

from __future__ import annotations

import pytest

from tests.support.clock import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock.wall()
