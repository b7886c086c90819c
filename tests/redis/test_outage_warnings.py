"""Exactly one "unreachable" warning per Redis outage, and one "reachable again after
X s" when it ends — with many threads and tasks calling through it, calls in flight when
it begins, and replies that arrive late (a paused server)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from callpolicy import Budget, CallPolicy, ResponseCache
from tests.support.redis_server import MakeStore, RedisServer

KEY = "acme::model-1"


def _messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "callpolicy.redis" and text in r.getMessage()
    ]


@pytest.mark.parametrize("fault", ["stopped", "paused"])
def test_one_warning_per_outage_and_one_when_it_ends(
    make_store: MakeStore, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    server = RedisServer()
    stop = threading.Event()
    try:
        store = make_store(server.url, socket_timeout=1.0, backoff_base=0.01, backoff_max=0.05)
        policy = CallPolicy(store=store, failure_rate_threshold=0.99)  # every outcome recorded
        budget = Budget(max_calls=1_000_000, store=store)
        cache = ResponseCache(backend=store)
        errors: list[BaseException] = []

        def sync_caller(n: int) -> None:
            while not stop.is_set():
                try:
                    policy.execute(KEY, lambda: "ok")
                    budget.commit(budget.reserve(KEY, 1), None)
                    cache.get(f"k{n}")
                except BaseException as exc:
                    errors.append(exc)
                    return

        async def async_callers() -> None:
            async def ok() -> str:
                return "ok"

            async def one() -> None:
                while not stop.is_set():
                    await policy.aexecute(KEY, ok)
                    await asyncio.sleep(0)

            await asyncio.gather(*(one() for _ in range(20)))

        def async_thread() -> None:
            try:
                asyncio.run(async_callers())
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=sync_caller, args=(n,)) for n in range(6)]
        threads += [threading.Thread(target=async_thread) for _ in range(1)]
        with caplog.at_level(logging.INFO, logger="callpolicy.redis"):
            for thread in threads:
                thread.start()
            for _ in range(2):  # two outages
                time.sleep(0.2)
                if fault == "stopped":
                    server.stop()
                else:
                    server.pause()
                _wait_for(lambda: store.health.down)
                time.sleep(1.5)  # calls go on locally, retry, time out
                if fault == "stopped":
                    server.start()
                else:
                    server.resume()
                _wait_for(lambda: not store.health.down)
            time.sleep(1.2)  # late replies and timeouts of the second outage come in
            stop.set()
            for thread in threads:
                thread.join(30)
        assert errors == []
        down = _messages(caplog, "unreachable")
        back = _messages(caplog, "reachable again after")
        assert len(down) == 2, down
        assert len(back) == 2, back
        assert all(" s; shared state resumes" in message for message in back)
        assert all(r.levelno == logging.WARNING for r in caplog.records if "reachable" in r.msg)
    finally:
        stop.set()
        server.stop()


def _wait_for(condition: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)
