"""RedisStore on a real 3-primary Redis Cluster: every script in one slot, every node used,
inspection across every node, and a cluster's errors never reaching a guarded call."""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from callpolicy import (
    Budget,
    BudgetExceededError,
    CallPolicy,
    CircuitOpenError,
    CircuitState,
    ResponseCache,
)
from callpolicy.__main__ import main as callpolicy_main
from callpolicy.redis import RedisStore
from tests.support import redis_workers
from tests.support.redis_cluster import RedisClusterNodes

KEY = redis_workers.KEY
SPAWN = multiprocessing.get_context("spawn")
# Keys whose circuits land on each of the three primaries (checked by a test below).
KEYS = [f"provider-{i}::model" for i in range(12)]

MakeClusterStore = Callable[..., RedisStore]


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterNodes]:
    nodes = RedisClusterNodes()
    try:
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture
async def make_store(cluster: RedisClusterNodes, prefix: str) -> AsyncIterator[MakeClusterStore]:
    """``RedisStore.from_url`` on the cluster (this test's prefix unless given), closed
    with ``aclose()`` when the test ends."""
    made: list[RedisStore] = []

    def make(url: str | None = None, **options: Any) -> RedisStore:
        options.setdefault("prefix", prefix)
        options.setdefault("socket_timeout", 5.0)  # a loaded CI machine: no false outage
        store = RedisStore.from_url(url or cluster.url, **options)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.aclose()


@pytest.fixture
def cluster_client(cluster: RedisClusterNodes) -> Iterator[RedisCluster]:
    client = cluster.client()
    try:
        yield client
    finally:
        client.close()


def down() -> str:
    raise ConnectionError("connection refused")


def _trip(policy: CallPolicy, key: str = KEY) -> None:
    with pytest.raises(ConnectionError):
        policy.execute(key, down)


def _evalsha_per_node(cluster: RedisClusterNodes) -> list[int]:
    counts = []
    for port in cluster.ports:
        with cluster.node(port) as node:
            stats = node.info("commandstats").get("cmdstat_evalsha", {})
            counts.append(int(stats.get("calls", 0)))
    return counts


def _worker_url(cluster: RedisClusterNodes) -> str:
    """The cluster's URL for a worker process, with timeouts a loaded 2-core CI machine
    does not hit (the default 0.5 s could read as an outage: local state, and the test
    would see a second probe)."""
    return f"{cluster.url}?socket_timeout=5&socket_connect_timeout=5"


def _run(target: object, *args: object) -> None:
    process = SPAWN.Process(target=target, args=args)
    process.start()
    process.join(60)
    assert process.exitcode == 0


def test_a_store_takes_a_cluster_client_a_cluster_url_or_cluster_true(
    cluster: RedisClusterNodes, prefix: str
) -> None:
    plain_url = cluster.url.replace("redis+cluster://", "redis://")
    with (
        RedisStore(cluster.client(), prefix=prefix, close_client=True) as handed,
        RedisStore.from_url(_worker_url(cluster), prefix=prefix) as by_scheme,
        RedisStore.from_url(plain_url, prefix=prefix, cluster=True) as by_option,
    ):
        for store in (handed, by_scheme, by_option):
            assert store.is_cluster
            assert isinstance(store.client, RedisCluster)
        _trip(CallPolicy(store=handed, failure_threshold=1))
        for store in (by_scheme, by_option):
            assert CallPolicy(store=store).state(KEY) is CircuitState.OPEN


def test_circuits_spread_over_every_primary_and_each_script_runs_on_its_slots_node(
    cluster: RedisClusterNodes, make_store: MakeClusterStore, caplog: pytest.LogCaptureFixture
) -> None:
    policy = CallPolicy(store=make_store(), failure_threshold=2)
    before = _evalsha_per_node(cluster)
    with caplog.at_level(logging.WARNING, logger="callpolicy.redis"):
        for key in KEYS:
            assert policy.execute(key, lambda: "ok") == "ok"
            _trip(policy, key)
            _trip(policy, key)
            with pytest.raises(CircuitOpenError):
                policy.execute(key, lambda: "never")
    # No fallback to local state: Redis decided every call.
    assert not [r for r in caplog.records if r.name == "callpolicy.redis"]
    ran = [
        after - earlier for after, earlier in zip(_evalsha_per_node(cluster), before, strict=True)
    ]
    assert all(n > 0 for n in ran), ran  # every primary served some circuits
    assert sum(ran) == len(KEYS) * 6  # admit x4, record x2 (the success was clean)


def test_a_trip_in_one_process_is_seen_by_the_next_call_of_another(
    cluster: RedisClusterNodes, prefix: str, make_store: MakeClusterStore
) -> None:
    results = SPAWN.Queue()
    _run(redis_workers.fail_n_times, _worker_url(cluster), prefix, 3, results)
    assert [results.get(timeout=10) for _ in range(4)] == ["failed"] * 3 + ["open"]
    with pytest.raises(CircuitOpenError) as refused:
        CallPolicy(store=make_store()).execute(KEY, lambda: "never")
    assert refused.value.failures == 3


def test_half_open_probes_are_limited_across_processes(
    cluster: RedisClusterNodes,
    prefix: str,
    make_store: MakeClusterStore,
    cluster_client: RedisCluster,
) -> None:
    policy = CallPolicy(store=make_store(), failure_threshold=1)
    _trip(policy)
    cluster_client.hset(f"{prefix}:cb:{{{KEY}}}", "open_until", 0)  # the cooldown is over
    results = SPAWN.Queue()
    release = SPAWN.Event()
    workers = [
        SPAWN.Process(
            target=redis_workers.probe_and_hold,
            args=(_worker_url(cluster), prefix, 1, results, release),
        )
        for _ in range(3)
    ]
    for worker in workers:
        worker.start()
    try:
        seen = sorted(results.get(timeout=60) for _ in workers)
    finally:
        release.set()
        for worker in workers:
            worker.join(30)
    assert seen == ["called", "refused", "refused"], seen
    assert policy.state(KEY) is CircuitState.CLOSED


def test_budgets_are_exact_across_threads_and_processes(
    cluster: RedisClusterNodes, prefix: str, make_store: MakeClusterStore
) -> None:
    results = SPAWN.Queue()
    _run(redis_workers.reserve_many, _worker_url(cluster), prefix, 6, results)
    assert results.get(timeout=10) == 6
    budget = Budget(max_calls=10, store=make_store().budget_store())
    granted = []
    barrier = threading.Barrier(40)

    def spend() -> None:
        barrier.wait()
        try:
            reservation = budget.reserve(KEY, 1)
        except BudgetExceededError:
            return
        budget.commit(reservation, None)
        granted.append(1)

    threads = [threading.Thread(target=spend) for _ in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(granted) == 4  # 10 - the other process's 6
    assert budget.usage().calls == 10


def test_budget_scopes_spread_over_nodes_and_reset_clears_every_node(
    make_store: MakeClusterStore,
) -> None:
    store = make_store()
    budget = Budget(max_calls=5, per_key=True, store=store.budget_store())
    for key in KEYS:
        budget.commit(budget.reserve(key, 1), None)
    assert sorted(budget.usages()) == sorted(KEYS)
    budget.reset()
    assert budget.usages() == {}
    assert budget.usage(KEYS[0]).calls == 0


def test_cache_hits_across_processes_and_the_lru_bound_on_a_cluster(
    cluster: RedisClusterNodes, prefix: str, make_store: MakeClusterStore
) -> None:
    results = SPAWN.Queue()
    _run(redis_workers.cached_call, _worker_url(cluster), prefix, results)
    redis_workers.cached_call(_worker_url(cluster), prefix, results)  # this process: a hit
    assert [results.get(timeout=10) for _ in range(2)] == ["model", "hit"]

    backend = make_store(prefix=f"{prefix}-lru").cache_backend(max_entries=3)
    for name in ("a", "b", "c"):
        backend.set(name, f'{{"v": "{name}"}}', ttl=600)
    assert backend.get("a") is not None
    backend.set("d", '{"v": "d"}', ttl=600)  # evicts b, named by the script at run time
    assert backend.get("b") is None
    assert [backend.get(n) is not None for n in ("a", "c", "d")] == [True, True, True]
    assert len(backend) == 3
    backend.clear()
    assert len(backend) == 0
    assert all(backend.get(n) is None for n in ("a", "c", "d"))


def test_shared_keys_and_status_see_circuits_on_every_node(
    cluster: RedisClusterNodes,
    prefix: str,
    make_store: MakeClusterStore,
    capsys: pytest.CaptureFixture[str],
) -> None:
    policy = CallPolicy(store=make_store(), failure_threshold=1)
    for key in KEYS:
        _trip(policy, key)
    assert make_store().shared_keys() == sorted(KEYS)

    assert callpolicy_main(["status", "--redis", cluster.url, "--prefix", prefix, "--json"]) == 0
    found = {item["key"]: item["state"] for item in json.loads(capsys.readouterr().out)}
    assert found == dict.fromkeys(KEYS, "open")
    for key in KEYS:
        policy.reset(key)
    assert {make_store().circuit_for_key(k).snapshot().state for k in KEYS} == {CircuitState.CLOSED}


async def test_async_calls_go_through_an_asyncio_cluster_client(
    make_store: MakeClusterStore, cluster: RedisClusterNodes
) -> None:
    store = make_store()
    policy = CallPolicy(store=store, failure_threshold=2)

    async def afail() -> str:
        raise ConnectionError("connection refused")

    async def aok() -> str:
        return "ok"

    before = sum(_evalsha_per_node(cluster))
    results = await asyncio.gather(*(policy.aexecute(key, aok) for key in KEYS))
    assert results == ["ok"] * len(KEYS)
    for key in KEYS:
        for _ in range(2):
            with pytest.raises(ConnectionError):
                await policy.aexecute(key, afail)
    for key in KEYS:
        with pytest.raises(CircuitOpenError):
            await policy.aexecute(key, aok)
    # admit x4, record x2 a key (plus the loads of the async client's first calls)
    assert sum(_evalsha_per_node(cluster)) - before >= len(KEYS) * 6
    # Seen by the sync path too (another client of the same cluster).
    assert CallPolicy(store=make_store()).state(KEYS[0]) is CircuitState.OPEN


def test_a_plain_client_of_one_node_falls_back_instead_of_raising_moved(
    cluster: RedisClusterNodes, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's first sight: a single-server URL pointed at one node. Keys of other
    nodes answer MOVED, which is a Redis fault (local state), never the caller's error."""
    url = f"redis://127.0.0.1:{cluster.ports[0]}/0"
    with RedisStore.from_url(url, prefix=prefix) as store, caplog.at_level(logging.WARNING):
        policy = CallPolicy(store=store, failure_threshold=2)
        for key in KEYS:
            assert policy.execute(key, lambda: "ok") == "ok"
            _trip(policy, key)
        cache = ResponseCache(backend=store)
        assert cache.get("anything") is None
    assert any("unreachable" in r.getMessage() for r in caplog.records)


def test_sync_calls_use_a_connection_per_thread_per_primary_and_follow_a_moved_slot(
    cluster: RedisClusterNodes, make_store: MakeClusterStore, caplog: pytest.LogCaptureFixture
) -> None:
    store = make_store()
    policy = CallPolicy(store=store, failure_threshold=2)
    for key in KEYS:
        _trip(policy, key)
    path = store._link._cluster_path
    assert path is not None
    assert len(path.connections) == 3  # this thread's, one to each primary

    # The client's slot map turns stale (as after a resharding): the primary it names
    # answers MOVED, and the call is made again through the client, which follows it.
    slots = store.client.nodes_manager.slots_cache
    slot = redis.crc.key_slot(f"{store.prefix}:cb:{{{KEYS[0]}}}".encode())
    right = slots[slot][0]
    wrong = next(n for n in store.client.get_primaries() if n.name != right.name)
    slots[slot] = [wrong]
    with caplog.at_level(logging.WARNING, logger="callpolicy.redis"):
        _trip(policy, KEYS[0])  # the second failure: Redis trips the circuit
        with pytest.raises(CircuitOpenError):
            policy.execute(KEYS[0], lambda: "never")
    assert not [r for r in caplog.records if r.name == "callpolicy.redis"]
    assert slots[slot][0].name == right.name  # the client patched its map
    with cluster.client() as plain:
        assert plain.hget(f"{store.prefix}:cb:{{{KEYS[0]}}}", "state") == b"open"

    store.close()
    assert len(path.connections) == 0


def test_a_key_that_would_span_slots_is_refused_clearly(make_store: MakeClusterStore) -> None:
    policy = CallPolicy(store=make_store())
    with pytest.raises(ValueError, match="hash slots"):
        policy.execute("}odd::model", lambda: "never")
    with pytest.raises(ValueError, match="prefix"):
        make_store(prefix="}odd").cache_backend()


def test_a_dead_primary_is_an_outage_for_callers_and_shared_state_resumes_after(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A primary dies: its slots are down (connection errors, then CLUSTERDOWN once the
    others notice), calls go on in local state; it comes back, and the shared state
    resumes. A cluster of its own: this one is broken on purpose."""
    own = RedisClusterNodes()
    try:
        store = RedisStore.from_url(own.url, prefix=prefix, backoff_base=0.01, backoff_max=0.01)
        with store, caplog.at_level(logging.INFO, logger="callpolicy.redis"):
            policy = CallPolicy(store=store, failure_threshold=1)
            budget = Budget(max_calls=100, store=store.budget_store())
            cache = ResponseCache(backend=store)
            own.kill(1)  # a third of the slots
            for key in KEYS:
                assert policy.execute(key, lambda: "ok") == "ok"
                budget.commit(budget.reserve(key, 1), None)
                assert cache.get(key) is None
            assert any("unreachable" in r.getMessage() for r in caplog.records)
            own.revive(1)
            for key in KEYS:
                _trip(policy, key)  # shared again: every circuit's trip is on the cluster
            with own.client() as plain:
                opened = [plain.hget(f"{prefix}:cb:{{{k}}}", "state") for k in KEYS]
            assert opened.count(b"open") >= len(KEYS) - 1  # the first may find it still down
            assert any("reachable again" in r.getMessage() for r in caplog.records)
    finally:
        own.stop()


def test_cluster_urls() -> None:
    from callpolicy.redis._topology import cluster_url

    assert cluster_url("redis+cluster://h:7000/0?client_name=a") == (
        "redis://h:7000/0?client_name=a",
        True,
    )
    assert cluster_url("REDISS+CLUSTER://u:p@h:7000") == ("rediss://u:p@h:7000", True)
    assert cluster_url("redis://h:6379/0") == ("redis://h:6379/0", False)


def test_cluster_errors_are_redis_faults_not_callers_errors() -> None:
    from callpolicy.redis._connection import UNREACHABLE

    for error in (
        redis.exceptions.MovedError("1 127.0.0.1:1"),
        redis.exceptions.AskError("1 127.0.0.1:1"),
        redis.exceptions.ClusterDownError("CLUSTERDOWN"),
        redis.exceptions.MasterDownError("MASTERDOWN"),
        redis.exceptions.TryAgainError("TRYAGAIN"),
        redis.exceptions.ReadOnlyError("READONLY"),
        redis.exceptions.SlotNotCoveredError("slot"),
    ):
        assert isinstance(error, UNREACHABLE), error
