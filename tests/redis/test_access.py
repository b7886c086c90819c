"""Redis authentication is configuration, not an outage; an outage keeps budgets' limits.

A wrong password, a missing one, or an ACL user without the permissions raises
:class:`StoreAccessError` naming the store (never its password) at the first call that
reaches Redis — the model is not called, no "unreachable" warning is logged, nothing
goes on with local state. While Redis is genuinely unreachable, a fail-open budget
still enforces its limits in each process.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from collections.abc import Iterator

import pytest

from callpolicy import Budget, BudgetExceededError, CallPolicy, ResponseCache
from callpolicy.redis import StoreAccessError
from tests.support import redis_workers
from tests.support.redis_server import MakeStore, RedisServer

KEY = redis_workers.KEY
PASSWORD = "s3cret-pw-7f3a"
SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture(scope="module")
def locked_server() -> Iterator[RedisServer]:
    """A redis-server started with ``--requirepass``, with two ACL users: ``nocmds`` may
    run no command, ``nokeys`` any command but only on keys ``other:*``."""
    server = RedisServer(requirepass=PASSWORD)
    try:
        with server.client() as admin:
            admin.acl_setuser(
                "nocmds", enabled=True, passwords=[f"+{PASSWORD}"], commands=["-@all"], keys=["*"]
            )
            admin.acl_setuser(
                "nokeys",
                enabled=True,
                passwords=[f"+{PASSWORD}"],
                commands=["+@all"],
                keys=["other:*"],
            )
        yield server
    finally:
        server.stop()


def _refused_urls(server: RedisServer) -> dict[str, str]:
    return {
        "wrong password": server.url_as(None, "not-" + PASSWORD),
        "wrong user and password": server.url_as("ghost", PASSWORD + "x"),
        "no password (NOAUTH)": server.url_as(None, None),
        "ACL user without commands (NOPERM)": server.url_as("nocmds", PASSWORD),
        "ACL user without the keys (NOPERM)": server.url_as("nokeys", PASSWORD),
    }


def _check(refusal: StoreAccessError, prefix: str) -> None:
    message = str(refusal)
    assert PASSWORD not in message
    assert f"prefix={prefix!r}" in message  # names the store
    assert "127.0.0.1" in message
    assert "not an outage" in message
    assert "unreachable" not in message.lower()


CASES = [
    "wrong password",
    "wrong user and password",
    "no password (NOAUTH)",
    "ACL user without commands (NOPERM)",
    "ACL user without the keys (NOPERM)",
]


@pytest.mark.parametrize("case", CASES)
def test_a_refused_login_or_permission_raises_store_access_error_at_first_use(
    locked_server: RedisServer,
    make_store: MakeStore,
    prefix: str,
    case: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = make_store(_refused_urls(locked_server)[case])
    policy = CallPolicy(store=store)
    called: list[str] = []

    def model() -> str:
        called.append("sync")
        return "ok"

    async def amodel() -> str:
        called.append("async")
        return "ok"

    with caplog.at_level(logging.INFO, logger="callpolicy"):
        with pytest.raises(StoreAccessError) as sync_refusal:
            policy.execute(KEY, model)
        with pytest.raises(StoreAccessError) as async_refusal:
            asyncio.run(policy.aexecute(KEY, amodel))
        budget = Budget(max_calls=10, store=store)
        with pytest.raises(StoreAccessError) as budget_refusal:
            budget.reserve(KEY, 1)
        with pytest.raises(StoreAccessError):
            budget.usage()
        # A cache is an optimisation: a refused lookup is a logged miss, never a hit.
        cache = ResponseCache(backend=store)
        assert cache.get("k") is None
    assert called == []  # no model call went on with local state
    assert not store.health.down
    for refusal in (sync_refusal, async_refusal, budget_refusal):
        _check(refusal.value, prefix)
    assert not any("unreachable" in r.getMessage() for r in caplog.records)
    assert all(PASSWORD not in r.getMessage() for r in caplog.records)
    assert any("refused access" in r.getMessage() for r in caplog.records)  # the cache's


def test_the_right_password_works_and_its_url_is_never_shown(
    locked_server: RedisServer, make_store: MakeStore
) -> None:
    store = make_store(locked_server.url)
    policy = CallPolicy(store=store, failure_threshold=1)
    assert policy.execute(KEY, lambda: "ok") == "ok"
    assert PASSWORD not in repr(store)
    assert PASSWORD not in store.url


def test_a_fail_open_budget_keeps_its_limits_in_a_process_cut_off_from_redis(
    make_store: MakeStore,
) -> None:
    server = RedisServer()
    try:
        store = make_store(server.url, socket_timeout=0.2, backoff_base=0.001, backoff_max=0.001)
        budget = Budget(max_calls=5, max_tokens=1_000, store=store)
        budget.commit(budget.reserve(KEY, 1), None)  # on Redis: the shared counters work
        server.stop()
        granted = 0
        refusals: list[BudgetExceededError] = []
        for _ in range(20):
            try:
                reservation = budget.reserve(KEY, 10)
            except BudgetExceededError as refusal:
                refusals.append(refusal)
                continue
            budget.commit(reservation, None)
            granted += 1
        assert granted == 5  # the limit, counted in this process while cut off
        assert len(refusals) == 15
        notes = getattr(refusals[0], "__notes__", [])
        assert any("counted in this process only" in note for note in notes)
    finally:
        server.stop()


def test_each_process_cut_off_from_redis_spends_at_most_the_limit(prefix: str) -> None:
    """Three real processes, a 4-call budget, Redis gone: each gets 4 (not all 10)."""
    server = RedisServer()
    url = server.url
    server.stop()  # nothing listens on its port now: genuinely unreachable
    results = SPAWN.Queue()
    workers = [
        SPAWN.Process(target=redis_workers.reserve_while_unreachable, args=(url, prefix, results))
        for _ in range(3)
    ]
    for worker in workers:
        worker.start()
    granted = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(30)
    assert granted == [4, 4, 4]
