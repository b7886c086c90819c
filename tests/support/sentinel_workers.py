"""Worker-process bodies of the Sentinel tests (importable by ``spawn``): a store from
``RedisStore.from_sentinel``, closed (``with``) before the process ends."""

from __future__ import annotations

import contextlib
from typing import Any

from callpolicy import CallPolicy
from callpolicy.redis import RedisStore
from tests.support.redis_workers import KEY


def fail_n_times(
    sentinels: list[tuple[str, int]], service: str, prefix: str, failures: int, results: Any
) -> None:
    """Fail ``failures`` calls in a row (enough to trip); report the state then."""

    def down() -> str:
        raise ConnectionError("connection refused")

    # Timeouts a loaded CI machine does not hit: a false outage would trip locally only.
    with RedisStore.from_sentinel(sentinels, service, prefix=prefix, socket_timeout=5) as store:
        policy = CallPolicy(store=store, failure_threshold=failures, cooldown=60)
        for _ in range(failures):
            with contextlib.suppress(ConnectionError):
                policy.execute(KEY, down)
        results.put(policy.state(KEY).value)
