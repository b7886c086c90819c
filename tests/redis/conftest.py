"""Fixtures of the Redis tests: the stores and clients a test makes are closed when it ends."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from callpolicy.redis import RedisStore
from tests.support.named_connections import named_ids
from tests.support.redis_server import MakeStore, RedisServer

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """In tests/redis (only) a ResourceWarning is an error: the tests close every store
    and client they make, so one is a leak of ours. (This hook sees the whole session's
    items: the others are left alone.) One raised in a ``__del__`` cannot propagate; it
    fails the test as an unraisable exception, an error by pyproject.toml's filter."""
    for item in items:
        if _HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.filterwarnings("error::ResourceWarning"))


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own: tests share one server and isolate by prefix."""
    return f"test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def make_store(redis_server: RedisServer, prefix: str) -> AsyncIterator[MakeStore]:
    """``make_store(url=None, **options)``: ``RedisStore.from_url`` (the session server and
    this test's prefix unless given), closed with ``aclose()`` when the test ends: in the
    test's event loop for an async test; for a sync one, its ``asyncio.run`` loops are
    closed by then, and their clients are released without them."""
    made: list[RedisStore] = []

    def make(url: str | None = None, **options: Any) -> RedisStore:
        options.setdefault("prefix", prefix)
        store = RedisStore.from_url(url or redis_server.url, **options)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.aclose()


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain client of the session server, beside the stores (closed at the end)."""
    with redis_server.client() as plain:
        yield plain


@pytest.fixture
def name() -> str:
    """A client name of this test's own, for counting its connections on the server."""
    return f"named-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def url(redis_server: RedisServer, name: str) -> str:
    """The session server's URL with this test's client name: every connection a store
    made from it opens carries the name."""
    return f"{redis_server.url}?client_name={name}"


@pytest.fixture
def count(client: redis.Redis, name: str) -> Callable[[], int]:
    """How many connections named ``name`` the server has now."""
    return lambda: len(named_ids(client, name))
