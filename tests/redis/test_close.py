"""RedisStore.close()/aclose(): a store closes the connections it opened, and only those.

Connections are counted on the real server (``CLIENT LIST``, through a separate client),
by a client name of the test's own given in the store's URL: the sync pool and every
``redis.asyncio`` client built from it carry it.
"""

from __future__ import annotations

import asyncio
import gc
import warnings
from collections.abc import Callable, Iterator

import pytest
import redis

from callpolicy import Budget, CallPolicy, CallPolicyError, ResponseCache
from callpolicy.redis import RedisStore, StoreClosedError
from tests.support.named_connections import asettles_at, settles, settles_at
from tests.support.redis_server import MakeStore

KEY = "acme::model-1"


@pytest.fixture
def no_resource_warnings() -> Iterator[None]:
    """Fails the test if a ResourceWarning is raised in it, collected garbage included."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


async def ok() -> str:
    return "ok"


async def _calls(policy: CallPolicy, n: int) -> None:
    """``n`` concurrent async calls: several connections of the running loop's client."""
    assert await asyncio.gather(*(policy.aexecute(KEY, ok) for _ in range(n))) == ["ok"] * n


def test_close_closes_the_connections_from_url_opened(
    make_store: MakeStore, url: str, count: Callable[[], int]
) -> None:
    store = make_store(url)
    policy = CallPolicy(store=store)
    assert policy.execute(KEY, lambda: "ok") == "ok"
    assert count() == 1
    store.close()
    assert store.is_closed
    assert settles_at(count, 0) == 0


async def test_aclose_closes_the_running_loops_client_and_the_sync_pool(
    make_store: MakeStore, url: str, count: Callable[[], int]
) -> None:
    store = make_store(url)
    policy = CallPolicy(store=store)
    policy.execute(KEY, lambda: "sync")
    await _calls(policy, 5)
    assert count() >= 3  # one sync, several async
    await store.aclose()
    assert settles_at(count, 0) == 0


def test_a_client_handed_to_the_store_stays_open(
    url: str, name: str, count: Callable[[], int], no_resource_warnings: None
) -> None:
    with redis.Redis.from_url(url) as mine:
        own_id = mine.client_id()
        store = RedisStore(mine, prefix=f"test-{name}")
        policy = CallPolicy(store=store)
        policy.execute(KEY, lambda: "sync")
        asyncio.run(_calls(policy, 3))  # an async client the store built: the store's
        assert count() >= 2
        store.close()
        assert settles_at(count, 1) == 1  # the async client's are gone, mine is not
        assert mine.client_id() == own_id  # the same connection, never closed
        assert mine.ping()


def test_close_client_true_closes_a_handed_client_too(
    url: str, name: str, count: Callable[[], int]
) -> None:
    with redis.Redis.from_url(url) as mine:
        store = RedisStore(mine, prefix=f"test-{name}", close_client=True)
        CallPolicy(store=store).execute(KEY, lambda: "sync")
        assert count() == 1
        store.close()
        assert settles_at(count, 0) == 0


async def test_close_and_aclose_are_idempotent(
    make_store: MakeStore, url: str, count: Callable[[], int]
) -> None:
    store = make_store(url)
    await _calls(CallPolicy(store=store), 3)
    await store.aclose()
    await store.aclose()
    store.close()
    store.close()
    assert store.is_closed
    assert settles_at(count, 0) == 0


def test_with_closes_the_store(url: str, count: Callable[[], int]) -> None:
    with RedisStore.from_url(url, prefix="test-with") as store:
        assert isinstance(store, RedisStore)
        CallPolicy(store=store).execute(KEY, lambda: "ok")
        assert count() == 1
        assert not store.is_closed
    assert store.is_closed
    assert settles_at(count, 0) == 0


async def test_a_sync_with_in_async_code_hands_the_running_loop_its_clients_close(
    url: str, count: Callable[[], int]
) -> None:
    with RedisStore.from_url(url, prefix="test-with-in-async") as store:
        await _calls(CallPolicy(store=store), 4)
        assert count() >= 1
    # close() cannot await here: the running loop closes its client as soon as it can.
    assert await asettles_at(count, 0) == 0


async def test_async_with_closes_the_store(url: str, count: Callable[[], int]) -> None:
    async with RedisStore.from_url(url, prefix="test-async-with") as store:
        assert isinstance(store, RedisStore)
        await _calls(CallPolicy(store=store), 4)
        assert count() >= 2
    assert store.is_closed
    assert settles_at(count, 0) == 0


async def test_a_call_after_close_raises_store_closed_error_and_opens_nothing(
    make_store: MakeStore, url: str, prefix: str, count: Callable[[], int]
) -> None:
    store = make_store(url)
    policy = CallPolicy(store=store)
    budget = Budget(max_calls=10, store=store)
    backend = store.cache_backend()
    policy.execute(KEY, lambda: "ok")
    await policy.aexecute(KEY, ok)
    await store.aclose()

    def model() -> str:
        raise AssertionError("a closed store's policy called the model")

    async def amodel() -> str:
        raise AssertionError("a closed store's policy called the model")

    refusals: list[StoreClosedError] = []
    for attempt in (
        lambda: policy.execute(KEY, model),
        lambda: policy.circuit(KEY).snapshot(),
        store.shared_keys,
        lambda: budget.reserve(KEY, 1),
        budget.usage,
        lambda: backend.get("k"),
        lambda: backend.set("k", "{}", ttl=None),
        lambda: backend.delete("k"),
        lambda: len(backend),
        store.budget_store,
        store.cache_backend,
    ):
        with pytest.raises(StoreClosedError) as refused:
            attempt()
        refusals.append(refused.value)
    with pytest.raises(StoreClosedError) as refused:
        await policy.aexecute(KEY, amodel)
    refusals.append(refused.value)

    for error in refusals:
        assert isinstance(error, CallPolicyError)
        assert isinstance(error, RuntimeError)
        assert f"RedisStore(prefix={prefix!r}) is closed" in str(error)
    assert settles_at(count, 0) == 0  # no call reconnected


def test_a_closed_store_raises_even_during_an_outage_instead_of_going_local(
    make_store: MakeStore,
) -> None:
    store = make_store()
    policy = CallPolicy(store=store)
    store.health.failed(ConnectionError("down"))  # an outage: calls would go local
    assert policy.execute(KEY, lambda: "local") == "local"
    store.close()
    with pytest.raises(StoreClosedError):
        policy.execute(KEY, lambda: "local")


def test_a_closed_store_is_a_logged_miss_for_a_response_cache(
    make_store: MakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    store = make_store()
    cache = ResponseCache(backend=store)
    store.close()
    assert cache.get("k") is None  # a failing backend is a miss, as documented...
    assert any("StoreClosedError" in r.getMessage() for r in caplog.records)  # ...logged


def test_a_store_used_from_two_loops_one_gone_one_open_then_closed_from_sync_code(
    make_store: MakeStore, url: str, count: Callable[[], int], no_resource_warnings: None
) -> None:
    store = make_store(url)
    policy = CallPolicy(store=store)
    alive = asyncio.new_event_loop()
    gone = asyncio.new_event_loop()
    try:
        alive.run_until_complete(_calls(policy, 3))
        alive_connections = count()
        assert alive_connections >= 1
        gone.run_until_complete(_calls(policy, 3))
        gone.close()  # closed without closing the store's client: its sockets are still open
        assert count() > alive_connections
        store.close()  # gone's released at once, without its loop; alive's handed to it
        assert settles_at(count, alive_connections) == alive_connections
        # The open loop closes its client (the aclose() close() scheduled) when it runs.
        assert alive.run_until_complete(asettles_at(count, 0)) == 0
    finally:
        alive.close()
        gone.close()


def test_a_store_used_from_two_asyncio_runs_then_closed(
    make_store: MakeStore, url: str, count: Callable[[], int], no_resource_warnings: None
) -> None:
    store = make_store(url)
    policy = CallPolicy(store=store)
    asyncio.run(_calls(policy, 3))
    assert count() >= 1  # left open when its loop closed
    asyncio.run(_calls(policy, 3))
    # The second loop's first call released the first loop's client: only its own remain.
    assert settles(count, lambda found: found <= 3) <= 3
    store.close()
    assert settles_at(count, 0) == 0


def test_aclose_in_one_live_loop_closes_its_client_and_releases_a_closed_loops(
    make_store: MakeStore, url: str, count: Callable[[], int], no_resource_warnings: None
) -> None:
    store = make_store(url)
    policy = CallPolicy(store=store)
    gone = asyncio.new_event_loop()
    live = asyncio.new_event_loop()
    try:
        gone.run_until_complete(_calls(policy, 3))
        gone_connections = count()
        live.run_until_complete(_calls(policy, 3))
        assert count() > gone_connections
        gone.close()  # after live's first call (which would release a closed loop's client)
        live.run_until_complete(store.aclose())
        assert settles_at(count, 0) == 0
    finally:
        live.close()
        gone.close()
