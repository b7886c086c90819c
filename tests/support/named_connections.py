"""Counting a test's own Redis connections on the real server (``CLIENT LIST``).

A test gives its store a client name of its own in the URL (``?client_name=...``); every
connection the store opens (the pool's, each thread's own, each ``redis.asyncio``
client's) carries it, so a separate client can see how many are open.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import redis

__all__ = ["asettles_at", "named_ids", "settles", "settles_at"]


def named_ids(client: redis.Redis, name: str) -> list[int]:
    """The ids of the server's connections named ``name``, now."""
    return [int(entry["id"]) for entry in client.client_list() if entry.get("name") == name]


def settles(count: Callable[[], int], ok: Callable[[int], bool], timeout: float = 5.0) -> int:
    """``count()`` once ``ok`` of it (the server notices a close within a few ms), or its
    last value when ``timeout`` is over."""
    deadline = time.monotonic() + timeout
    while True:
        found = count()
        if ok(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def settles_at(count: Callable[[], int], expected: int, timeout: float = 5.0) -> int:
    """:func:`settles` at exactly ``expected``."""
    return settles(count, lambda found: found == expected, timeout)


async def asettles_at(count: Callable[[], int], expected: int, timeout: float = 5.0) -> int:
    """:func:`settles_at` that lets the running loop run meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        found = count()
        if found == expected or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.01)
