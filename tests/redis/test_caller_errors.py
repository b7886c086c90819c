"""On a shared Redis store, one worker's invalid inputs never refuse another worker's calls."""

from __future__ import annotations

import multiprocessing

import pytest
from langchain_openai import ChatOpenAI

from callpolicy import CallPolicy, CircuitState, ErrorClass
from langchain_breaker import CircuitBreakerChatModel
from tests.support import redis_workers
from tests.support.openai_server import OpenAICompatServer
from tests.support.redis_server import MakeStore, RedisServer

SPAWN = multiprocessing.get_context("spawn")


class Opaque:
    """A value no JSON encoder knows."""


def test_caller_mistakes_in_one_worker_never_refuse_another_workers_calls(
    redis_server: RedisServer,
    prefix: str,
    make_store: MakeStore,
    openai_server: OpenAICompatServer,
) -> None:
    model = CircuitBreakerChatModel(
        inner=ChatOpenAI(
            model="gpt-4o-mini",
            base_url=openai_server.base_url,
            api_key="sk-test",
            max_retries=0,
            timeout=2.0,
        ),
        key=redis_workers.KEY,
        policy=CallPolicy(store=make_store(), failure_threshold=3, cooldown=60),
    )
    for _ in range(2):
        with pytest.raises(ValueError, match="Invalid input type"):
            model.invoke(None)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            model.invoke("hi", extra_body={"x": Opaque()})
    assert openai_server.requests == []
    assert model.state_for() is CircuitState.CLOSED
    assert model.policy.metrics()[redis_workers.KEY].ignored == {ErrorClass.CALLER: 4}

    # Another process, on the same Redis, calls the same model: admitted.
    results = SPAWN.Queue()
    process = SPAWN.Process(target=redis_workers.one_call, args=(redis_server.url, prefix, results))
    process.start()
    process.join(60)
    assert process.exitcode == 0
    assert results.get(timeout=10) == "called"
