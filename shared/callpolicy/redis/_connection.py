"""What the Redis-backed stores share: which errors mean "unreachable", the health of the
connection (a warning once per outage, retries with a growing backoff), and what a closed
store leaves behind (:class:`StoreClosedError`, :func:`release_closed_loop_client`)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._errors import CallPolicyError

__all__ = [
    "UNREACHABLE",
    "ClosedHealth",
    "Health",
    "StoreClosedError",
    "release_closed_loop_client",
    "text",
]

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


class StoreClosedError(CallPolicyError, RuntimeError):
    """Raised when a :class:`~callpolicy.redis.RedisStore` (or the budget store or cache
    backend it handed out) is used after ``close()``/``aclose()``."""


class ClosedHealth(Health):
    """The health of a closed store: any call that would reach Redis raises
    :class:`StoreClosedError`. Swapped in by ``close()``, so that the calls, which ask
    ``usable()`` anyway, need no check of their own."""

    def __init__(self, message: str) -> None:
        super().__init__(backoff_base=1.0, backoff_max=1.0)
        self.message = message

    def usable(self) -> bool:
        raise StoreClosedError(self.message)

    def failed(self, exc: BaseException) -> None:
        """A call in flight when the store closed lost its connection: no outage."""

    def succeeded(self) -> None:
        pass


def release_closed_loop_client(client: aioredis.Redis) -> None:
    """Close the sockets of ``client``, whose event loop is already closed.

    Its connections can no longer be closed the usual way (``await client.aclose()``
    needs their loop), and left to the garbage collector each one warns (unclosed
    transport, "loop is closed"). Each transport is marked closing (``abort()``; the
    closed loop refuses to schedule the rest), then what its loop would have run next is
    run here: ``connection_lost``, which closes the socket. A transport without that
    step (not asyncio's selector transport: uvloop, TLS) is left to the collector.
    """
    pool: Any = client.connection_pool
    connection: Any
    for connection in [*pool._available_connections, *pool._in_use_connections]:
        writer = getattr(connection, "_writer", None)
        if writer is None:
            continue
        transport = writer.transport
        # "Event loop is closed": the loop could not schedule connection_lost.
        with contextlib.suppress(RuntimeError):
            transport.abort()
        lost = getattr(transport, "_call_connection_lost", None)
        if lost is not None and getattr(transport, "_sock", None) is not None:
            # Waking a waiter of the closed loop may raise too; the socket is closed first.
            with contextlib.suppress(RuntimeError):
                lost(None)
        connection._close()  # forget the streams (the transport is closing: no loop call)
    pool.reset()
