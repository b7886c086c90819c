"""What the Redis-backed stores share: which errors mean "unreachable", and the health of
the connection (a warning once per outage, retries with a growing backoff)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["UNREACHABLE", "Health", "text"]

logger = logging.getLogger("callpolicy.redis")

UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Health:
    """Whether Redis is thought reachable, and when to try again if not."""

    def __init__(self, *, backoff_base: float, backoff_max: float) -> None:
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._backoff = backoff_base
        self._base = backoff_base
        self._max = backoff_max

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def usable(self) -> bool:
        return self._down_since is None or time.monotonic() >= self._retry_at

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            now = time.monotonic()
            if self._down_since is None:
                self._down_since = now
                self._backoff = self._base
                logger.warning(
                    "callpolicy: Redis unreachable (%s); using local state until it answers again",
                    type(exc).__name__,
                )
            else:
                self._backoff = min(self._backoff * 2, self._max)
            self._retry_at = now + self._backoff

    def succeeded(self) -> None:
        if self._down_since is None:
            return
        with self._lock:
            if self._down_since is not None:
                logger.info(
                    "callpolicy: Redis reachable again after %.1fs; shared state resumes",
                    time.monotonic() - self._down_since,
                )
                self._down_since = None
