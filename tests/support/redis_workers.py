"""Worker-process bodies for the multi-process Redis tests (importable by ``spawn``).

Each closes the store it opens (``with``) before its process ends."""

from __future__ import annotations

import multiprocessing.synchronize
from typing import Any

from callpolicy import CallPolicy, CircuitOpenError
from callpolicy.redis import RedisStore

KEY = "acme::model-1"


def fail_n_times(url: str, prefix: str, failures: int, results: Any) -> None:
    """Fail ``failures`` calls in a row (enough to trip), report what each raised."""

    def down() -> str:
        raise ConnectionError("connection refused")

    with RedisStore.from_url(url, prefix=prefix) as store:
        policy = CallPolicy(store=store, failure_threshold=failures, cooldown=60)
        for _ in range(failures):
            try:
                policy.execute(KEY, down)
            except ConnectionError:
                results.put("failed")
        results.put(policy.state(KEY).value)


def one_call(url: str, prefix: str, results: Any) -> None:
    """Make one healthy call; report whether the model ran or the circuit refused."""
    with RedisStore.from_url(url, prefix=prefix) as store:
        policy = CallPolicy(store=store, failure_threshold=3, cooldown=60)
        try:
            results.put(policy.execute(KEY, lambda: "called"))
        except CircuitOpenError:
            results.put("refused")


def probe_and_hold(
    url: str,
    prefix: str,
    half_open_max_calls: int,
    results: Any,
    release: multiprocessing.synchronize.Event,
) -> None:
    """Call a half-open circuit; an admitted probe reports, then holds until released."""

    def model() -> str:
        results.put("called")
        release.wait(30)
        return "ok"

    with RedisStore.from_url(url, prefix=prefix) as store:
        policy = CallPolicy(
            store=store, failure_threshold=3, cooldown=60, half_open_max_calls=half_open_max_calls
        )
        try:
            policy.execute(KEY, model)
        except CircuitOpenError:
            results.put("refused")


def reserve_many(url: str, prefix: str, attempts: int, results: Any) -> None:
    """Try ``attempts`` reservations against a shared 10-call budget; report successes."""
    from callpolicy import Budget, BudgetExceededError

    granted = 0
    with RedisStore.from_url(url, prefix=prefix) as store:
        budget = Budget(max_calls=10, store=store)
        for _ in range(attempts):
            try:
                reservation = budget.reserve(KEY, 1)
            except BudgetExceededError:
                continue
            budget.commit(reservation, None)
            granted += 1
    results.put(granted)


def cached_call(url: str, prefix: str, results: Any) -> None:
    """One cached call through a shared Redis cache; report where the answer came from."""
    from callpolicy import CallRequest, ResponseCache

    request: CallRequest[dict[str, str]] = CallRequest(
        describe=lambda: {"messages": ["what is 2+2?"]},
        encode=lambda answer: answer,
        decode=lambda payload: payload,
        mark=lambda answer, status: {**answer, "status": status},
    )
    with RedisStore.from_url(url, prefix=prefix) as store:
        answer = CallPolicy(store=store).execute(
            KEY,
            lambda: {"text": "4", "status": "model"},
            cache=ResponseCache(backend=store),
            request=request,
        )
    results.put(answer["status"])


def reserve_while_unreachable(url: str, prefix: str, results: Any) -> None:
    """Try 10 reservations against a 4-call budget on a Redis that cannot be reached
    (fail open); report how many were granted."""
    from callpolicy import Budget, BudgetExceededError

    granted = 0
    with RedisStore.from_url(url, prefix=prefix, socket_timeout=0.2) as store:
        budget = Budget(max_calls=4, store=store)
        for _ in range(10):
            try:
                reservation = budget.reserve(KEY, 1)
            except BudgetExceededError:
                continue
            budget.commit(reservation, None)
            granted += 1
    results.put(granted)
