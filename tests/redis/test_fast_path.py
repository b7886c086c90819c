"""RedisStore's sync hot path: a store from ``from_url`` runs admit/record on a connection
of each calling thread's own, not through the pool (``ThreadConnection``).

The connections are counted on the real server (``CLIENT LIST``, through a separate
client), by a client name of the test's own given in the store's URL: the pool and every
thread's own connection carry it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
from redis.connection import PythonRespSerializer

from callpolicy import CallPolicy, CircuitOpenError, CircuitState, Outcome
from callpolicy.redis import RedisStore, StoreClosedError, _connection
from tests.support.named_connections import named_ids, settles_at
from tests.support.redis_server import MakeStore

KEY = "acme::model-1"
THREADS = 16


def own_connection_id(store: RedisStore) -> int:
    """The server's id of the calling thread's own connection (``CLIENT ID`` on it)."""
    connection = store._link._thread.connection.connection
    connection.send_command("CLIENT", "ID")
    return int(connection.read_response())


def down() -> str:
    raise ConnectionError("connection refused")


def _end_cooldown(client: redis.Redis, prefix: str) -> None:
    client.hset(f"{prefix}:cb:{{{KEY}}}", "open_until", 0)


def in_threads(work: Callable[[int], object], threads: int = THREADS) -> list[object]:
    """``work(i)`` in ``threads`` threads alive together (each its own, none reused)."""
    results: list[object] = [None] * threads
    started = threading.Barrier(threads)

    def run(i: int) -> None:
        started.wait(timeout=10)
        results[i] = work(i)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    assert not any(worker.is_alive() for worker in workers)
    return results


def test_each_thread_has_its_own_connection_and_close_closes_them_all(
    make_store: MakeStore, url: str, count: Callable[[], int]
) -> None:
    store = make_store(url)
    policy = CallPolicy(store=store)
    called = threading.Barrier(THREADS + 1)
    closed = threading.Event()
    after_close: list[object] = []

    def work() -> None:
        for _ in range(20):
            assert policy.execute(KEY, lambda: "ok") == "ok"
        called.wait(timeout=10)  # every thread alive, holding its connection
        closed.wait(timeout=10)
        try:
            policy.execute(KEY, lambda: "after close")
        except StoreClosedError as refused:
            after_close.append(refused)

    workers = [threading.Thread(target=work) for _ in range(THREADS)]
    for worker in workers:
        worker.start()
    try:
        called.wait(timeout=10)
        assert count() == THREADS  # one each; the pool opened none (no call went through it)
        assert len(store._link._thread_connections) == THREADS
        store.close()  # their threads are alive: close() closes them, not their ends
        assert settles_at(count, 0) == 0
    finally:
        closed.set()
        for worker in workers:
            worker.join(30)
    assert len(after_close) == THREADS  # a closed store refuses, and reconnects nothing
    assert settles_at(count, 0) == 0


def test_close_while_threads_hammer_the_store_leaves_no_connection_open(
    make_store: MakeStore, url: str, count: Callable[[], int]
) -> None:
    store = make_store(url)
    policy = CallPolicy(store=store)
    running = threading.Barrier(THREADS + 1)

    def hammer() -> int:
        calls = 0
        while True:
            if calls == 5:
                running.wait(timeout=10)
            try:
                policy.execute(KEY, lambda: "ok")
            except StoreClosedError:
                return calls
            except Exception:  # a call in flight at close() may lose its connection
                continue
            calls += 1

    with ThreadPoolExecutor(THREADS) as pool:
        futures = [pool.submit(hammer) for _ in range(THREADS)]
        running.wait(timeout=10)
        store.close()
        calls = [future.result(timeout=30) for future in futures]
        # The threads still live (the executor's): a connection reopened by a call in
        # flight at close() was closed by that call, not by its thread's end.
        assert settles_at(count, 0) == 0
    assert all(n >= 5 for n in calls)


def test_a_thread_that_ends_releases_its_connection(
    make_store: MakeStore, url: str, count: Callable[[], int]
) -> None:
    store = make_store(url)
    policy = CallPolicy(store=store)
    policy.execute(KEY, lambda: "main")  # the main thread's own, kept
    for _ in range(30):  # short-lived threads, one after the other
        worker = threading.Thread(target=policy.execute, args=(KEY, lambda: "worker"))
        worker.start()
        worker.join(10)
        assert settles_at(count, 1) == 1  # only the main thread's is left
    assert len(store._link._thread_connections) == 1
    results = in_threads(lambda _: policy.execute(KEY, lambda: "together"))
    assert results == ["together"] * THREADS
    assert settles_at(count, 1) == 1


def test_noscript_after_script_flush_is_recovered_transparently(
    make_store: MakeStore, client: redis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = make_store()
    policy = CallPolicy(store=store, failure_threshold=3, failure_rate_threshold=None)
    circuit = policy.circuit(KEY)
    assert policy.execute(KEY, lambda: "ok") == "ok"
    with caplog.at_level(logging.WARNING, logger="callpolicy.redis"):
        client.script_flush()
        with pytest.raises(ConnectionError):  # admit: NOSCRIPT, loaded, run again
            policy.execute(KEY, down)
        permit = circuit.admit()
        client.script_flush()
        assert circuit.record(permit, Outcome.FAILURE) is CircuitState.CLOSED  # record too
    assert client.hget(f"{prefix}:cb:{{{KEY}}}", "failures") == b"2"  # shared state, not local
    assert not store.health.down
    assert not caplog.records
    # Loaded again by the call that found it missing (admit's was flushed after its own).
    admit, record = store._link._scripts["admit"].sha, store._link._scripts["record"].sha
    assert client.script_exists(admit, record) == [False, True]


def test_a_killed_connection_is_replaced_on_the_next_call_without_an_outage(
    make_store: MakeStore,
    url: str,
    name: str,
    client: redis.Redis,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = make_store(url)
    policy = CallPolicy(store=store, failure_threshold=5)
    assert policy.execute(KEY, lambda: "ok") == "ok"
    (killed,) = named_ids(client, name)
    assert own_connection_id(store) == killed
    with caplog.at_level(logging.WARNING, logger="callpolicy.redis"):
        assert client.client_kill_filter(_id=str(killed)) == 1
        with pytest.raises(ConnectionError):
            policy.execute(KEY, down)  # recorded in Redis: admitted there, not locally
    assert client.hget(f"{prefix}:cb:{{{KEY}}}", "failures") == b"1"
    assert not store.health.down
    assert not [r for r in caplog.records if "unreachable" in r.getMessage()]
    (replacement,) = named_ids(client, name)
    assert replacement != killed
    assert own_connection_id(store) == replacement


def test_a_timeout_falls_back_to_local_state_and_the_next_call_reconnects(
    make_store: MakeStore, client: redis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = make_store(socket_timeout=0.1, backoff_base=0.001, backoff_max=0.001)
    policy = CallPolicy(store=store, failure_threshold=5)
    assert policy.execute(KEY, lambda: "ok") == "ok"
    client.client_pause(600)  # every other client's command waits: a stalled Redis
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="callpolicy.redis"):
        assert policy.execute(KEY, lambda: "local") == "local"
    assert time.monotonic() - started < 0.5  # socket_timeout, not the pause
    assert store.health.down
    assert any("TimeoutError" in r.getMessage() for r in caplog.records)
    client.client_unpause()
    # The timed-out connection was dropped: its late reply cannot answer the next call.
    with pytest.raises(ConnectionError):
        policy.execute(KEY, down)
    assert not store.health.down
    assert client.hget(f"{prefix}:cb:{{{KEY}}}", "failures") == b"1"


@pytest.mark.parametrize("path", ["own", "pooled"])
def test_trips_and_probes_across_threads_are_the_same_on_either_path(
    make_store: MakeStore, url: str, client: redis.Redis, prefix: str, path: str
) -> None:
    store = make_store(url)
    if path == "pooled":  # what a store handed a client does
        store._link._thread_connection_limit = 0
    policy = CallPolicy(store=store, failure_threshold=THREADS, half_open_max_calls=2)
    own_connections: list[bool] = []

    def fail(_: int) -> str:
        try:
            policy.execute(KEY, down)
        except ConnectionError:
            return "failed"
        except CircuitOpenError:
            return "refused"
        finally:
            own_connections.append(store._link._thread.connection is not None)
        return "called"

    assert in_threads(fail) == ["failed"] * THREADS  # admitted together, all recorded
    assert own_connections == [path == "own"] * THREADS
    assert policy.state(KEY) is CircuitState.OPEN
    with pytest.raises(CircuitOpenError) as refused:
        policy.execute(KEY, lambda: "never")
    assert refused.value.failures == THREADS

    _end_cooldown(client, prefix)
    all_tried = threading.Barrier(THREADS, timeout=10)

    def probe(_: int) -> str:
        def hold() -> str:
            all_tried.wait()  # a probe holds its slot until every thread has tried
            return "called"

        try:
            return policy.execute(KEY, hold)
        except CircuitOpenError:
            all_tried.wait()
            return "refused"

    seen = in_threads(probe)
    assert seen.count("called") == 2
    assert seen.count("refused") == THREADS - 2
    assert policy.state(KEY) is CircuitState.CLOSED  # both probes succeeded
    snapshot = policy.circuit(KEY).snapshot()
    assert (snapshot.failures, snapshot.trips, snapshot.probes_in_flight) == (0, 1, 0)


def test_at_most_max_connections_threads_have_their_own_the_others_share_the_pool(
    make_store: MakeStore, url: str, count: Callable[[], int], caplog: pytest.LogCaptureFixture
) -> None:
    store = make_store(url, max_connections=4)
    policy = CallPolicy(store=store)
    held = threading.Barrier(THREADS)

    def work(_: int) -> tuple[str, bool]:
        answer = policy.execute(KEY, lambda: "ok")
        held.wait(timeout=10)  # all alive: none has released its own yet
        return policy.execute(KEY, lambda: answer), store._link._thread.connection is not None

    with caplog.at_level(logging.WARNING, logger="callpolicy.redis"):
        results = in_threads(work)
    assert [answer for answer, _ in results] == ["ok"] * THREADS
    assert sum(own for _, own in results) == 4  # the other 12 shared the pool (of 4)
    assert not caplog.records  # no pool exhaustion read as an outage
    assert len(store._link._thread_connections) == 0  # their threads ended
    pooled = len(store.client.connection_pool._connections)  # type: ignore[attr-defined]
    assert pooled >= 1  # the other 12 went through the pool
    assert settles_at(count, pooled) == pooled  # the 4 own ones closed as their threads ended


def test_a_store_handed_a_client_uses_only_that_clients_pool(
    url: str, name: str, count: Callable[[], int], prefix: str
) -> None:
    with redis.Redis.from_url(url) as mine:
        store = RedisStore(mine, prefix=prefix)
        policy = CallPolicy(store=store)
        assert in_threads(lambda _: policy.execute(KEY, lambda: "ok"), 4) == ["ok"] * 4
        assert len(store._link._thread_connections) == 0
        assert not hasattr(store._link._thread, "connection")  # this thread made no call
        assert policy.execute(KEY, lambda: "main") == "main"
        assert store._link._thread.connection is None  # decided once: the pool
        pool: Any = mine.connection_pool
        # Every connection of this name on the server is one of mine's pool: none of the
        # store's own.
        assert count() == len(pool._available_connections) + len(pool._in_use_connections)
        store.close()


def test_redis_pys_own_packer_sends_the_same_bytes(
    make_store: MakeStore, client: redis.Redis, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without hiredis, the connection's packer: same commands, same results."""
    store = make_store()
    policy = CallPolicy(store=store, failure_rate_threshold=0.5, cooldown_multiplier=1.5)
    policy.execute(KEY, lambda: "ok")
    connection = store._link._thread.connection.connection
    python = PythonRespSerializer(connection._buffer_cutoff, connection.encoder.encode)
    parts = ("EVALSHA", "ab" * 20, 3, "k:{x}", "é", 1.5, 2.0, 2**40, -1, b"raw")
    assert _connection._pack(parts, connection) == [b"".join(python.pack(*parts))]

    monkeypatch.setattr(_connection, "_hiredis_pack", None)
    monkeypatch.setattr(connection, "_command_packer", python)  # as without hiredis
    assert _connection._pack(parts, connection) == python.pack(*parts)
    with pytest.raises(ConnectionError):
        policy.execute(KEY, down)  # admit and record (a float among its arguments)
    assert policy.execute(KEY, lambda: "ok again") == "ok again"
    snapshot = policy.circuit(KEY).snapshot()
    assert (snapshot.calls_in_window, snapshot.failures_in_window) == (3, 1)
    assert client.hget(f"{prefix}:cb:{{{KEY}}}", "failures") == b"0"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_opens_its_own_connection_and_leaves_its_parents_alone(
    make_store: MakeStore,
) -> None:
    store = make_store()
    policy = CallPolicy(store=store)
    assert policy.execute(KEY, lambda: "parent") == "parent"
    parent_id = own_connection_id(store)
    pid = os.fork()
    if pid == 0:  # the child: report by exit code, run nothing of pytest's
        code = 1
        try:
            if policy.execute(KEY, lambda: "child") == "child" and not store.health.down:
                code = 2 if own_connection_id(store) == parent_id else 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert policy.execute(KEY, lambda: "parent again") == "parent again"
    assert own_connection_id(store) == parent_id  # the child did not close it
