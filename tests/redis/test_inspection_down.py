"""Inspection and control while Redis is down, and after ``close()``: a clear callpolicy
error (or, for a policy's snapshot, its local state), never a redis-py exception."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import redis

from callpolicy import Budget, CallPolicy, CallPolicyError, CircuitState, ResponseCache
from callpolicy.redis import StoreClosedError, StoreUnavailableError
from tests.support.redis_server import MakeStore, RedisServer

KEY = "acme::model-1"


def _raises_ours(call: Callable[[], Any], kind: type[CallPolicyError]) -> str:
    with pytest.raises(CallPolicyError) as raised:
        call()
    assert isinstance(raised.value, kind), repr(raised.value)
    assert not isinstance(raised.value, redis.RedisError)
    return str(raised.value)


def test_inspection_while_redis_is_down_and_after_close(make_store: MakeStore) -> None:
    server = RedisServer()
    try:
        store = make_store(server.url, socket_timeout=0.2, backoff_base=0.001, backoff_max=0.001)
        policy = CallPolicy(store=store, failure_threshold=1)
        budget = Budget(max_calls=10, store=store)
        per_key = Budget(max_calls=10, per_key=True, store=store)
        cache = ResponseCache(backend=store)
        policy.execute(KEY, lambda: "ok")
        budget.commit(budget.reserve(KEY, 1), None)
        per_key.commit(per_key.reserve(KEY, 1), None)
        cache.set("k", {"a": 1})
        assert budget.usage().calls == 1
        assert cache.stats().entries == 1

        server.stop()
        inspections: list[tuple[Callable[[], Any], str]] = [
            (budget.usage, "reading budget"),
            (per_key.usages, "listing budgets"),
            (budget.reset, "listing budgets"),
            (per_key.reset, "listing budgets"),
            (cache.stats, "counting cache entries"),
            (cache.clear, "clearing the cache"),
            (lambda: policy.trip(KEY), "forcing circuit"),
            (lambda: policy.reset(KEY), "forcing circuit"),
            (store.shared_keys, "listing circuits"),
        ]
        for call, what in inspections:
            message = _raises_ours(call, StoreUnavailableError)
            assert what in message
            assert f"127.0.0.1:{server.port}" in message  # names the store
        # A policy's snapshot degrades to this process's local state.
        assert policy.snapshot()[KEY].state is CircuitState.CLOSED
        # The calls themselves go on (local state), as before.
        assert policy.execute(KEY, lambda: "ok") == "ok"

        store.close()
        for call, _ in [*inspections, (policy.snapshot, "")]:
            _raises_ours(call, StoreClosedError)
    finally:
        server.stop()


def test_the_status_command_while_redis_is_down_says_so_plainly() -> None:
    server = RedisServer()
    url = server.url
    server.stop()
    done = subprocess.run(
        [sys.executable, "-m", "callpolicy", "status", "--redis", url, "--timeout", "0.2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.startswith(f"cannot read {url}: listing circuits:")
    assert "cannot be reached" in done.stderr
    assert "Traceback" not in done.stderr
