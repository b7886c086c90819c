"""Figure 8: what a fleet costs Redis — round trips, Redis commands and server CPU per
guarded call, so a user can size Redis for N workers.

For each kind of guarded call (healthy, healthy with a failure-rate window, failing,
refused by an open circuit, with a budget, a cache hit) the server's own counters are
read before and after a run of calls: ``INFO commandstats`` (round trips are the
``EVALSHA`` the store sends; every other command counted ran inside a script) and
``INFO cpu`` (``used_cpu_user + used_cpu_sys``: the server's CPU time, so calls per
second per Redis core = 1 / CPU seconds per call, however fast the client is).

The same calls are then made with 1,000 other circuits in Redis and from 8 threads: the
commands per call must not change (no script's cost grows with keys or workers). On a
real 3-primary Redis Cluster (``tests/support/redis_cluster.py``) the same figures are
summed over the nodes, and the client's time per call is compared with one server's:
a cluster store makes every call through ``redis.cluster.RedisCluster`` (no per-thread
fast path), and the ratio shows what that costs the client.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import redis

from callpolicy import Budget, CallPolicy, CallRequest, CircuitOpenError, ResponseCache
from callpolicy.redis import RedisStore
from tests.support.redis_cluster import RedisClusterNodes
from tests.support.redis_server import RedisServer

from ._harness import Result

_TOP_LEVEL = ("evalsha", "eval", "script")  # what the store sends; the rest ran in scripts
_IGNORED = ("info",)  # this benchmark's own reads


@dataclass
class Cost:
    """Per guarded call, from the servers' counters."""

    round_trips: float
    commands: float  # run inside the scripts
    cpu_us: float  # server CPU
    client_us: float  # CPU of the calling process (all its threads), per call

    @property
    def per_core(self) -> float:
        """Guarded calls per second one Redis core carries."""
        return 1e6 / self.cpu_us if self.cpu_us else float("inf")


def _counters(nodes: list[redis.Redis]) -> tuple[dict[str, int], float]:
    commands: dict[str, int] = {}
    cpu = 0.0
    for node in nodes:
        for name, stats in node.info("commandstats").items():
            command = name.removeprefix("cmdstat_").split("|")[0]
            commands[command] = commands.get(command, 0) + int(stats["calls"])
        info = node.info("cpu")
        cpu += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    return commands, cpu


def _cost(nodes: list[redis.Redis], call: Callable[[], None], calls: int, threads: int = 1) -> Cost:
    for _ in range(max(calls // 20, 5)):
        call()  # warm: scripts loaded, connections open
    before, cpu_before = _counters(nodes)
    start = time.process_time()
    if threads == 1:
        for _ in range(calls):
            call()
    else:

        def work() -> None:
            for _ in range(calls // threads):
                call()

        with ThreadPoolExecutor(threads) as pool:
            for future in [pool.submit(work) for _ in range(threads)]:
                future.result()
    elapsed = time.process_time() - start
    after, cpu_after = _counters(nodes)
    delta = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    trips = sum(v for k, v in delta.items() if k in _TOP_LEVEL)
    inside = sum(v for k, v in delta.items() if k not in _TOP_LEVEL and k not in _IGNORED)
    return Cost(
        round_trips=trips / calls,
        commands=inside / calls,
        cpu_us=(cpu_after - cpu_before) * 1e6 / calls,
        client_us=elapsed * 1e6 / calls,
    )


def _request() -> CallRequest[dict[str, str]]:
    return CallRequest(
        describe=lambda: {"messages": ["what is 2+2?"]},
        encode=lambda answer: answer,
        decode=lambda payload: payload,
        mark=lambda answer, status: {**answer, "status": status},
    )


def _down() -> str:
    raise ConnectionError("connection refused")


def _scenarios(store: RedisStore) -> dict[str, Callable[[], None]]:
    """One guarded call of each kind, on ``store``."""
    healthy = CallPolicy(store=store)
    windowed = CallPolicy(store=store, failure_rate_threshold=0.5)  # successes only: never trips
    failing = CallPolicy(store=store, failure_threshold=10**9)
    refusing = CallPolicy(store=store, failure_threshold=1, cooldown=3600)
    with contextlib.suppress(ConnectionError):
        refusing.execute("fleet::open", _down)
    budget = Budget(max_calls=10**9, store=store.budget_store())
    cache = ResponseCache(backend=store)
    request = _request()
    healthy.execute(
        "fleet::cached", lambda: {"text": "4", "status": "model"}, cache=cache, request=request
    )

    def failing_call() -> None:
        with contextlib.suppress(ConnectionError):
            failing.execute("fleet::failing", _down)

    def open_call() -> None:
        with contextlib.suppress(CircuitOpenError):
            refusing.execute("fleet::open", lambda: "never")

    return {
        "healthy": lambda: healthy.execute("fleet::healthy", lambda: "ok"),
        "healthy, failure-rate window": lambda: windowed.execute("fleet::window", lambda: "ok"),
        "failing (below the threshold)": failing_call,
        "open (refused)": open_call,
        "healthy, with a budget": lambda: healthy.execute(
            "fleet::budget", lambda: {"text": "4"}, budget=budget, request=request
        ),
        "cache hit": lambda: healthy.execute(
            "fleet::cached", lambda: {"text": "never"}, cache=cache, request=request
        ),
    }


def _rows(where: str, costs: dict[str, Cost]) -> list[Result]:
    rows = []
    for name, cost in costs.items():
        healthy = name == "healthy"
        rows.append(
            Result(
                f"fleet ({where}): round trips per guarded call, {name}",
                [cost.round_trips],
                "<= 1" if healthy else "-",
                cost.round_trips <= 1.0 if healthy else True,
                f"{cost.commands:.1f} Redis commands in scripts; server CPU "
                f"{cost.cpu_us:.1f} us/call = {cost.per_core:,.0f} calls/s per Redis core; "
                f"client CPU {cost.client_us:.0f} us/call",
                info=not healthy,
            )
        )
    return rows


def _single_server(quick: bool) -> tuple[list[Result], dict[str, Cost]]:
    server = RedisServer()
    calls = 500 if quick else 5_000
    try:
        with (
            RedisStore.from_url(server.url, prefix=f"fleet-{uuid.uuid4().hex[:8]}") as store,
            server.client() as node,
        ):
            nodes = [node]
            scenarios = _scenarios(store)
            costs = {name: _cost(nodes, call, calls) for name, call in scenarios.items()}
            results = _rows("one server", costs)

            # Scale: 1,000 other circuits in Redis, then 8 threads: same cost per call.
            policy = CallPolicy(store=store, failure_threshold=10**9)
            for i in range(1_000):
                with contextlib.suppress(ConnectionError):
                    policy.execute(f"fleet::other-{i}", _down)
            scaled = {
                "failing, 1,000 other circuits": _cost(
                    nodes, scenarios["failing (below the threshold)"], calls
                ),
                "failing, 8 threads": _cost(
                    nodes, scenarios["failing (below the threshold)"], calls, threads=8
                ),
                "with a budget, 8 threads": _cost(
                    nodes, scenarios["healthy, with a budget"], calls, threads=8
                ),
            }
            base = costs["failing (below the threshold)"].commands
            for name, cost in scaled.items():
                reference = costs["healthy, with a budget"].commands if "budget" in name else base
                results.append(
                    Result(
                        f"fleet (one server): commands per call, {name} / alone",
                        [cost.commands / reference],
                        "== 1.00",
                        abs(cost.commands / reference - 1) < 0.01,
                        f"{cost.commands:.2f} vs {reference:.2f} commands; "
                        f"{cost.round_trips:.2f} round trips",
                    )
                )
            return results, costs
    finally:
        server.stop()


def _cluster(cluster: RedisClusterNodes, quick: bool) -> list[Result]:
    calls = 500 if quick else 5_000
    nodes = [cluster.node(port) for port in cluster.ports]
    try:
        with RedisStore.from_url(cluster.url, prefix=f"fleet-{uuid.uuid4().hex[:8]}") as store:
            scenarios = _scenarios(store)
            costs = {name: _cost(nodes, call, calls) for name, call in scenarios.items()}
    finally:
        for node in nodes:
            node.close()
    return _rows("3-primary cluster", costs)


def _cpu_rows(
    policies: dict[str, CallPolicy], *, loops: int, repeats: int
) -> dict[str, list[float]]:
    """CPU ns of this thread per healthy call of each policy, interleaved (the order
    rotates each repeat). CPU time, not wall-clock: the client's own work, unaffected by
    the other processes of a shared machine as a wall clock is."""
    names = list(policies)
    found: dict[str, list[float]] = {name: [] for name in names}
    for policy in policies.values():
        for _ in range(max(loops // 10, 1)):
            policy.execute("fleet::healthy", _ok)
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            execute = policies[name].execute
            start = time.thread_time_ns()
            for _ in range(loops):
                execute("fleet::healthy", _ok)
            found[name].append((time.thread_time_ns() - start) / loops)
    return found


def _ok() -> str:
    return "ok"


def _client_paths(server: RedisServer, cluster: RedisClusterNodes, quick: bool) -> list[Result]:
    """A healthy guarded call (one round trip), the client's CPU time: a single
    server's per-thread connection, a cluster store's per-thread connection to the
    slot's primary (``from_url``), and a store handed a ``RedisCluster`` (every call
    through it)."""
    prefix = f"fleet-{uuid.uuid4().hex[:8]}"
    with (
        RedisStore.from_url(server.url, prefix=prefix) as single,
        RedisStore.from_url(cluster.url, prefix=prefix) as routed,
        RedisStore(cluster.client(), prefix=prefix, close_client=True) as through,
    ):
        policies = {
            "single": CallPolicy(store=single),
            "routed": CallPolicy(store=routed),
            "through": CallPolicy(store=through),
        }
        loops, repeats = (200, 3) if quick else (1_000, 7)
        found = _cpu_rows(policies, loops=loops, repeats=repeats)
    us = {name: statistics.median(ns) / 1000 for name, ns in found.items()}
    routed_ratio = [r / s for r, s in zip(found["routed"], found["single"], strict=True)]
    through_ratio = [t / s for t, s in zip(found["through"], found["single"], strict=True)]
    return [
        Result(
            "fleet: client CPU per healthy call, cluster store (from_url) / one server's",
            routed_ratio,
            "<= 1.5",
            statistics.median(routed_ratio) <= 1.5,
            f"{us['routed']:.0f} vs {us['single']:.0f} us: each thread's own connection "
            "to the primary of the circuit's slot",
            info=False,
        ),
        Result(
            "fleet: client CPU per healthy call, store handed a RedisCluster / one server's",
            through_ratio,
            "-",
            True,
            f"{us['through']:.0f} vs {us['single']:.0f} us: every call through "
            "redis.cluster.RedisCluster (what the per-thread path saves)",
            info=True,
        ),
    ]


def run(*, quick: bool) -> list[Result]:
    results, single = _single_server(quick)
    server = RedisServer()
    cluster = RedisClusterNodes()
    try:
        results.extend(_cluster(cluster, quick))
        results.extend(_client_paths(server, cluster, quick))
    finally:
        cluster.stop()
        server.stop()
    median_core = statistics.median(c.per_core for c in single.values())
    results.append(
        Result(
            "fleet: guarded calls/s per Redis core, median of the kinds above",
            [median_core],
            "-",
            True,
            "size Redis for N workers: N x calls/s per worker / this (see docs/redis.md)",
            info=True,
        )
    )
    return results
