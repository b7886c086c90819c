"""RedisStore: one breaker shared by every process, decided atomically on the server."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing

import pytest
import redis

from callpolicy import CallPolicy, CircuitOpenError, CircuitState
from tests.support import redis_workers
from tests.support.redis_server import MakeStore, RedisServer

KEY = redis_workers.KEY
SPAWN = multiprocessing.get_context("spawn")


def _hash_key(prefix: str, key: str = KEY) -> str:
    return f"{prefix}:cb:{{{key}}}"


def _end_cooldown(client: redis.Redis, prefix: str) -> None:
    """Let the cooldown be over now, without waiting for it (time is the server's)."""
    client.hset(_hash_key(prefix), "open_until", 0)


def down() -> str:
    raise ConnectionError("connection refused")


def _run(target: object, *args: object, timeout: float = 60) -> None:
    process = SPAWN.Process(target=target, args=args)
    process.start()
    process.join(timeout)
    assert process.exitcode == 0


def test_a_trip_in_one_process_is_seen_by_the_next_call_of_another(
    redis_server: RedisServer, prefix: str, make_store: MakeStore
) -> None:
    results = SPAWN.Queue()
    _run(redis_workers.fail_n_times, redis_server.url, prefix, 3, results)
    assert [results.get(timeout=10) for _ in range(4)] == ["failed"] * 3 + ["open"]

    _run(redis_workers.one_call, redis_server.url, prefix, results)
    assert results.get(timeout=10) == "refused"

    # ...and this process too, through its own store object.
    policy = CallPolicy(store=make_store())
    with pytest.raises(CircuitOpenError) as refused:
        policy.execute(KEY, lambda: "never")
    assert refused.value.failures == 3
    assert refused.value.retry_in is not None
    assert 0 < refused.value.retry_in <= 60


@pytest.mark.parametrize("half_open_max_calls", [1, 2])
def test_half_open_probes_are_limited_across_processes(
    redis_server: RedisServer,
    prefix: str,
    make_store: MakeStore,
    client: redis.Redis,
    half_open_max_calls: int,
) -> None:
    policy = CallPolicy(store=make_store(), failure_threshold=1)
    with pytest.raises(ConnectionError):
        policy.execute(KEY, down)
    _end_cooldown(client, prefix)

    results = SPAWN.Queue()
    release = SPAWN.Event()
    workers = [
        SPAWN.Process(
            target=redis_workers.probe_and_hold,
            args=(redis_server.url, prefix, half_open_max_calls, results, release),
        )
        for _ in range(6)
    ]
    for worker in workers:
        worker.start()
    try:
        seen = sorted(results.get(timeout=60) for _ in workers)
    finally:
        release.set()
        for worker in workers:
            worker.join(30)
    assert seen.count("called") == half_open_max_calls
    assert seen.count("refused") == 6 - half_open_max_calls
    assert policy.state(KEY) is CircuitState.CLOSED  # the probes succeeded


def test_a_probe_whose_process_died_frees_its_slot_when_its_lease_ends(
    prefix: str, make_store: MakeStore, client: redis.Redis
) -> None:
    policy = CallPolicy(store=make_store(), failure_threshold=1)
    with pytest.raises(ConnectionError):
        policy.execute(KEY, down)
    _end_cooldown(client, prefix)
    circuit = policy.circuit(KEY)
    abandoned = circuit.admit()  # a probe that will never report back
    assert abandoned.probe
    with pytest.raises(CircuitOpenError):
        circuit.admit()
    probes = f"{_hash_key(prefix)}:probes"
    for member in client.zrange(probes, 0, -1):
        client.zadd(probes, {member: 0})  # the lease is over
    assert policy.execute(KEY, lambda: "recovered") == "recovered"
    assert policy.state(KEY) is CircuitState.CLOSED


async def test_async_callers_share_the_same_state_as_sync_ones(
    prefix: str, make_store: MakeStore, client: redis.Redis
) -> None:
    policy = CallPolicy(store=make_store(), failure_threshold=2)

    async def adown() -> str:
        raise ConnectionError("connection refused")

    for _ in range(2):
        with pytest.raises(ConnectionError):
            await policy.aexecute(KEY, adown)
    other = CallPolicy(store=make_store())
    with pytest.raises(CircuitOpenError):
        other.execute(KEY, lambda: "never")
    _end_cooldown(client, prefix)

    async def ok() -> str:
        return "probe ok"

    assert await policy.aexecute(KEY, ok) == "probe ok"
    assert other.state(KEY) is CircuitState.CLOSED


def test_async_clients_work_from_several_event_loops(make_store: MakeStore) -> None:
    policy = CallPolicy(store=make_store())

    async def ok() -> str:
        return "ok"

    for _ in range(3):  # each asyncio.run is a new loop; clients are per loop
        assert asyncio.run(policy.aexecute(KEY, ok)) == "ok"


def test_keys_are_namespaced_and_expire(
    prefix: str, make_store: MakeStore, client: redis.Redis
) -> None:
    policy = CallPolicy(store=make_store(key_ttl=600), failure_threshold=5)
    with pytest.raises(ConnectionError):
        policy.execute(KEY, down)
    keys = [k.decode() for k in client.scan_iter(match=f"{prefix}:*")]
    assert keys == [_hash_key(prefix)]
    assert 0 < client.pttl(keys[0]) <= 600_000
    assert client.hget(keys[0], "failures") == b"1"
    assert policy.store.shared_keys() == [KEY]  # type: ignore[attr-defined]


def test_the_cooldown_runs_on_the_servers_clock_not_the_hosts(make_store: MakeStore) -> None:
    skewed_host_clock = lambda: 1e9  # noqa: E731 - a host whose clock is far off
    policy = CallPolicy(
        store=make_store(),
        clock=skewed_host_clock,
        failure_threshold=1,
        cooldown=30,
    )
    with pytest.raises(ConnectionError):
        policy.execute(KEY, down)
    with pytest.raises(CircuitOpenError) as refused:
        policy.execute(KEY, lambda: "never")
    assert refused.value.retry_in is not None
    assert 25 < refused.value.retry_in <= 30


def test_redis_outage_falls_back_to_local_state_and_recovers(
    prefix: str, make_store: MakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer()  # our own: this test stops and restarts it
    try:
        store = make_store(server.url, socket_timeout=0.2, backoff_base=0.001, backoff_max=0.001)
        policy = CallPolicy(store=store, failure_threshold=2)
        assert policy.execute(KEY, lambda: "shared") == "shared"

        server.stop()
        with caplog.at_level(logging.WARNING, logger="callpolicy.redis"):
            for _ in range(5):  # calls keep working, on local state
                assert policy.execute(KEY, lambda: "local") == "local"
            for _ in range(2):
                with pytest.raises(ConnectionError):
                    policy.execute(KEY, down)
            with pytest.raises(CircuitOpenError):  # the local breaker still protects
                policy.execute(KEY, lambda: "never")
        unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(unreachable) == 1  # once per outage, not once per call

        server.start()  # empty again: no persistence
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="callpolicy.redis"):
            assert policy.execute(KEY, lambda: "shared again") == "shared again"
        assert any("reachable again" in r.getMessage() for r in caplog.records)
        with pytest.raises(ConnectionError):
            policy.execute(KEY, down)
        with server.client() as own_client:
            assert own_client.hget(_hash_key(prefix), "failures") == b"1"
    finally:
        server.stop()


async def test_more_concurrent_callers_than_pool_connections_wait_instead_of_failing_over(
    make_store: MakeStore, caplog: pytest.LogCaptureFixture
) -> None:
    store = make_store(max_connections=4)
    policy = CallPolicy(store=store)

    async def ok() -> str:
        return "ok"

    with caplog.at_level(logging.WARNING, logger="callpolicy.redis"):
        answers = await asyncio.gather(*(policy.aexecute(KEY, ok) for _ in range(200)))
    assert answers == ["ok"] * 200
    assert not [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert not store.health.down
