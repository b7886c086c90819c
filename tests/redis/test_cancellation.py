"""Cancellation frees what it took, on the Redis path.

Thousands of async calls, on several threads each with its own event loop, through a
half-open circuit (every admission takes a probe lease), a budget and a cache on one
Redis store, are cancelled at random points: before, during and after their admission,
their budget reservation, their cache lookup, their single-flight wait, their model call
and their record. Afterwards no lease, no reservation and no flight is left, and no
cancelled task went on to call the model.
"""

from __future__ import annotations

import asyncio
import gc
import random
import threading
from typing import Any

import pytest
import redis

from callpolicy import Budget, CallPolicy, CallRequest, Outcome, ResponseCache
from tests.support.redis_server import MakeStore

KEY = "acme::model-1"
THREADS = 4
TASKS = 250  # per thread


def _request(prompt: str) -> CallRequest[str]:
    return CallRequest(
        describe=lambda: {"prompt": prompt},
        input_text=lambda: prompt,
        encode=lambda text: {"text": text},
        decode=lambda payload: str(payload["text"]),
    )


# Each thread's asyncio.run() ends its loop; a redis.asyncio connection whose round trip
# that ending cuts is dropped by redis-py without closing its socket (upstream), and the
# collector reports the socket in whichever test runs then. This test is about leases,
# reservations and flights: it collects those sockets itself (below) and ignores them.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_cancelled_calls_leave_no_lease_reservation_or_flight_and_never_call_the_model(
    make_store: MakeStore, client: redis.Redis, prefix: str
) -> None:
    store = make_store(socket_timeout=10)  # a loaded machine is no outage here
    # Half-open, as after a cooldown: every admission is a probe with a lease. The
    # thresholds keep it half-open however many probes succeed.
    circuit_key = f"{prefix}:cb:{{{KEY}}}"
    client.hset(circuit_key, mapping={"state": "half_open", "gen": 1})
    policy = CallPolicy(store=store, half_open_max_calls=1_000_000, success_threshold=1_000_000)
    budget = Budget(max_calls=1_000_000, store=store)
    cache = ResponseCache(backend=store)
    cancel_requested: set[asyncio.Task[Any]] = set()  # tasks task.cancel() was called on
    lock = threading.Lock()
    went_on: list[asyncio.Task[Any]] = []
    model_calls = [0]

    async def model() -> str:
        me = asyncio.current_task()
        with lock:
            model_calls[0] += 1
            if me in cancel_requested:
                went_on.append(me)
        await asyncio.sleep(random.choice([0, 0, 0.0005, 0.002]))
        return "answer"

    async def one_call(n: int, rng: random.Random) -> str:
        mode = n % 3
        if mode == 0:
            return await policy.aexecute(KEY, model)
        if mode == 1:
            return await policy.aexecute(KEY, model, budget=budget, request=_request(f"b{n}"))
        # A few prompts only: identical concurrent misses share one flight.
        prompt = f"c{rng.randrange(8)}-{n // 50}"
        return await policy.aexecute(
            KEY, model, budget=budget, cache=cache, request=_request(prompt)
        )

    async def run(seed: int) -> int:
        rng = random.Random(seed)
        tasks = [asyncio.ensure_future(one_call(n, rng)) for n in range(TASKS)]

        async def cancel_later(task: asyncio.Task[Any]) -> None:
            # A random point: some loop iterations (each await of the Redis path takes
            # a few), or some time (a round trip, a model call).
            if rng.random() < 0.5:
                for _ in range(rng.randrange(40)):
                    await asyncio.sleep(0)
            else:
                await asyncio.sleep(rng.uniform(0, 0.004))
            with lock:
                if not task.done():
                    cancel_requested.add(task)
                    task.cancel()

        cancellers = [cancel_later(t) for t in tasks if rng.random() < 0.7]
        await asyncio.gather(*cancellers)
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        for outcome in outcomes:
            assert outcome == "answer" or isinstance(outcome, asyncio.CancelledError), outcome
        # What a cancelled round trip took is given back when its reply is in.
        await store._link.drain()
        return sum(isinstance(o, asyncio.CancelledError) for o in outcomes)

    cancelled: list[int] = []

    def thread_main(seed: int) -> None:
        cancelled.append(asyncio.run(run(seed)))

    threads = [threading.Thread(target=thread_main, args=(seed,)) for seed in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)

    gc.collect()  # the dropped sockets are reported here, not in a later test
    assert len(cancelled) == THREADS
    assert sum(cancelled) > THREADS * TASKS // 4  # the test did cancel many calls
    assert model_calls[0] > 0
    assert went_on == []  # no cancelled task called the model
    assert client.zcard(f"{circuit_key}:probes") == 0  # no probe lease left
    assert budget.usage().in_flight == 0  # no reservation left
    assert len(cache._flights) == 0  # no single-flight slot left
    assert client.hget(circuit_key, "state") == b"half_open"


async def test_a_cancelled_admission_raises_and_does_not_refuse_the_next_probe(
    make_store: MakeStore, client: redis.Redis, prefix: str
) -> None:
    """One probe slot; admissions cancelled at each point of their round trip: each one
    whose cancel() was accepted ends cancelled (redis-py can swallow it: asyncio.wait_for
    on Python <= 3.11 returns a result that came in with the cancellation), and its lease
    is freed, so the next call is admitted as the probe (before: refused for 60 s)."""
    store = make_store(socket_timeout=10)
    circuit_key = f"{prefix}:cb:{{{KEY}}}"
    client.hset(circuit_key, mapping={"state": "half_open", "gen": 1})
    policy = CallPolicy(store=store, half_open_max_calls=1)
    circuit = policy.circuit(KEY)
    cancelled = 0
    for n in range(60):
        admission = asyncio.ensure_future(circuit.aadmit())
        for _ in range(n % 8):  # 0..7 loop iterations into its round trip
            await asyncio.sleep(0)
        if admission.cancel():
            with pytest.raises(asyncio.CancelledError):
                await admission
            cancelled += 1
        else:  # done before the cancel: an ordinary probe, released as a caller would
            await circuit.arecord(admission.result(), Outcome.IGNORED)
        await store._link.drain()  # the round trip of the cancelled call, and its release
        assert client.zcard(f"{circuit_key}:probes") == 0
    assert cancelled > 30

    async def healthy() -> str:
        return "ok"

    assert await policy.aexecute(KEY, healthy) == "ok"  # admitted as the probe; closes
    assert client.hget(circuit_key, "state") == b"closed"


async def test_aclose_right_after_a_cancellation_still_frees_the_lease(
    make_store: MakeStore, client: redis.Redis, prefix: str
) -> None:
    circuit_key = f"{prefix}:cb:{{{KEY}}}"
    freed = 0
    for n in range(20):
        store = make_store(socket_timeout=10)
        client.hset(circuit_key, mapping={"state": "half_open", "gen": 1})
        circuit = CallPolicy(store=store, half_open_max_calls=1).circuit(KEY)
        admission = asyncio.ensure_future(circuit.aadmit())
        for _ in range(n % 6):
            await asyncio.sleep(0)
        if not admission.cancel():
            await circuit.arecord(admission.result(), Outcome.IGNORED)
        else:
            with pytest.raises(asyncio.CancelledError):
                await admission
            freed += 1
        await store.aclose()  # waits for the cancelled round trip and its release
        assert client.zcard(f"{circuit_key}:probes") == 0
    assert freed > 10
