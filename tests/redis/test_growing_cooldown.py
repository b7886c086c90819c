"""A growing cooldown on Redis: capped before it is grown, however long the outage."""

from __future__ import annotations

import math

import pytest
import redis

from callpolicy import CallPolicy, CircuitState
from callpolicy._numbers import MAX_SECONDS
from tests.support.redis_server import MakeStore

KEY = "acme::model-1"


def down() -> str:
    raise ConnectionError("connection refused")


@pytest.mark.parametrize("max_cooldown", [None, 3600.0])
def test_a_long_outage_of_re_opens_never_overflows_the_cooldown(
    make_store: MakeStore, client: redis.Redis, prefix: str, max_cooldown: float | None
) -> None:
    """150 failed probes in a row, each growing the cooldown a thousandfold: 1000**150
    is past a double's range, so the script must cap before it grows."""
    policy = CallPolicy(
        store=make_store(),
        failure_threshold=1,
        cooldown=30,
        cooldown_multiplier=1000,
        max_cooldown=max_cooldown,
    )
    cap = MAX_SECONDS if max_cooldown is None else max_cooldown
    seen: list[float] = []
    for _ in range(150):
        with pytest.raises(ConnectionError):
            policy.execute(KEY, down)
        snapshot = policy.snapshot()[KEY]
        assert snapshot.state is CircuitState.OPEN
        assert snapshot.retry_in is not None
        assert math.isfinite(snapshot.retry_in)
        seen.append(snapshot.retry_in)
        client.hset(f"{prefix}:cb:{{{KEY}}}", "open_until", 0)  # the cooldown is over now
    assert seen[0] <= 30
    assert max(seen) <= cap
    assert seen[-1] > cap - 5  # at the cap, not wrapped around nor reset
