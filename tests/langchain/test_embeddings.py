"""``CircuitBreakerEmbeddings`` with the real ``OpenAIEmbeddings`` over HTTP against the
loopback server's ``/v1/embeddings``: an ``InMemoryVectorStore`` indexing and searching
through an outage and a 429 storm, the vector cache proven by the server's request count
(memory, SQLite and Redis backends), a failed batch cached nowhere, and fallbacks that
are not the same model refused."""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_openai import OpenAIEmbeddings

from callpolicy import (
    AllModelsFailedError,
    Budget,
    BudgetExceededError,
    CallPolicy,
    CircuitState,
    MemoryCacheBackend,
    RetryPolicy,
    SQLiteCacheBackend,
    VectorCache,
)
from callpolicy.redis import RedisStore
from langchain_breaker import CircuitBreakerEmbeddings
from tests.support.clock import FakeClock, FakeSleeper
from tests.support.openai_server import Fail, OpenAICompatServer
from tests.support.redis_server import RedisServer

MODEL = "text-embedding-3-small"
KEY, BACKUP_KEY = f"openai::{MODEL}", f"openai-backup::{MODEL}"
DOCS = ["the cat sat on the mat", "dogs chase cats", "a treatise on mats", "rain in Spain"]


def openai_embeddings(server: OpenAICompatServer, **options: Any) -> OpenAIEmbeddings:
    options.setdefault("model", MODEL)
    return OpenAIEmbeddings(
        base_url=server.base_url,
        api_key="sk-test",
        max_retries=0,
        timeout=5.0,
        check_embedding_ctx_length=False,  # no tiktoken download: texts go as text
        **options,
    )


def guarded(
    server: OpenAICompatServer, clock: FakeClock, *, fallback: bool = True, **options: Any
) -> CircuitBreakerEmbeddings:
    options.setdefault("cache", VectorCache())
    sleeper = FakeSleeper(clock)
    policy = CallPolicy(
        clock=clock,
        sleep=sleeper,
        async_sleep=sleeper.asleep,
        failure_threshold=options.pop("failure_threshold", 2),
        retry=options.pop("retry", None),
    )
    return CircuitBreakerEmbeddings(
        inner=openai_embeddings(server),
        # The same model at another endpoint (here the same server): a circuit of its own.
        fallback=openai_embeddings(server) if fallback else None,
        fallback_keys=[BACKUP_KEY] if fallback else None,
        policy=policy,
        **options,
    )


async def index_and_search(
    embeddings: CircuitBreakerEmbeddings, mode: str, query: str = "cats"
) -> list[str]:
    store = InMemoryVectorStore(embedding=embeddings)
    if mode == "sync":
        store.add_texts(DOCS)
        found = store.similarity_search(query, k=2)
    else:
        await store.aadd_texts(DOCS)
        found = await store.asimilarity_search(query, k=2)
    return [doc.page_content for doc in found]


async def test_indexing_and_search_survive_an_outage_and_the_cache_saves_every_repeat(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    server = openai_server
    embeddings = guarded(server, clock, failure_threshold=1)
    baseline = await index_and_search(guarded(server, clock, fallback=False), mode)
    server_before = len(server.embedding_requests)  # type: ignore[attr-defined]
    server.push_embeddings(Fail(503))  # type: ignore[attr-defined]
    found = await index_and_search(embeddings, mode)
    assert found == baseline, "the fallback (the same model) gives the same answer"
    # One failed batch of the primary (which opened its circuit), the fallback's batch,
    # then the query: straight to the fallback (the primary is open).
    assert len(server.embedding_requests) - server_before == 3  # type: ignore[attr-defined]
    assert embeddings.state_for() is CircuitState.OPEN
    assert embeddings.policy.metrics()[BACKUP_KEY].successes == 2

    # Index the same texts and ask again: every vector comes from the cache.
    before = len(server.embedding_requests)  # type: ignore[attr-defined]
    assert await index_and_search(embeddings, mode) == found
    assert len(server.embedding_requests) == before  # type: ignore[attr-defined]


async def test_a_429_storm_is_retried_through_the_breaker_then_cached(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    server = openai_server
    embeddings = guarded(
        server,
        clock,
        fallback=False,
        failure_threshold=5,
        retry=RetryPolicy(max_attempts=4, jitter=0),
    )
    slow_down = Fail(429, "rate limited", headers={"retry-after": "1"})
    server.push_embeddings(slow_down, slow_down, slow_down)  # type: ignore[attr-defined]
    assert len(await index_and_search(embeddings, mode)) == 2
    metrics = embeddings.policy.metrics()[KEY]
    assert (metrics.retries, metrics.successes) == (3, 2)  # the batch retried; the query
    texts = server.embedded_texts  # type: ignore[attr-defined]
    assert texts.count(DOCS[0]) == 4  # three refusals and the answer, nothing more

    before = len(server.embedding_requests)  # type: ignore[attr-defined]
    assert len(await index_and_search(embeddings, mode)) == 2
    assert len(server.embedding_requests) == before  # type: ignore[attr-defined]


async def test_a_batch_that_fails_midway_caches_nothing(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    server = openai_server
    cache = VectorCache()
    embeddings = CircuitBreakerEmbeddings(
        inner=openai_embeddings(server, chunk_size=2),  # two requests for four texts
        cache=cache,
        policy=CallPolicy(clock=clock),
    )
    server.push_embeddings(None, Fail(500))  # type: ignore[attr-defined]
    with pytest.raises(Exception, match="500"):
        await _embed(embeddings, mode, DOCS)
    assert len(cache) == 0, "the two texts the first request embedded are not cached alone"
    vectors = (
        embeddings.embed_documents(DOCS)
        if mode == "sync"
        else await embeddings.aembed_documents(DOCS)
    )
    assert len(vectors) == 4
    assert len(cache) == 4
    texts = server.embedded_texts  # type: ignore[attr-defined]
    assert texts.count(DOCS[0]) == 2  # embedded again: the failed batch had cached nothing


async def test_only_the_misses_are_embedded_each_once_in_one_call(
    openai_server: OpenAICompatServer, clock: FakeClock
) -> None:
    embeddings = guarded(openai_server, clock, fallback=False)
    embeddings.embed_documents(DOCS[:2])
    before = len(openai_server.embedding_requests)  # type: ignore[attr-defined]
    vectors = embeddings.embed_documents([DOCS[0], DOCS[2], DOCS[2], DOCS[3], DOCS[1]])
    requests = openai_server.embedding_requests[before:]  # type: ignore[attr-defined]
    assert [r["input"] for r in requests] == [[DOCS[2], DOCS[3]]]
    assert vectors[1] == vectors[2]
    assert vectors[0] == embeddings.embed_documents([DOCS[0]])[0]


def test_a_query_and_a_document_are_cached_apart(
    openai_server: OpenAICompatServer, clock: FakeClock
) -> None:
    embeddings = guarded(openai_server, clock, fallback=False)
    embeddings.embed_documents(["same text"])
    embeddings.embed_query("same text")  # some providers embed queries differently
    assert len(openai_server.embedding_requests) == 2  # type: ignore[attr-defined]
    embeddings.embed_query("same text")
    assert len(openai_server.embedding_requests) == 2  # type: ignore[attr-defined]


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_the_cache_is_shared_across_instances_on_sqlite_and_redis(
    openai_server: OpenAICompatServer,
    clock: FakeClock,
    tmp_path: Path,
    redis_server: RedisServer,
    backend: str,
) -> None:
    stores: list[Any] = []
    prefix = f"test-{uuid.uuid4().hex[:8]}"

    def cache() -> VectorCache:
        # A backend of its own each time, as another process would open.
        if backend == "sqlite":
            sqlite = SQLiteCacheBackend(tmp_path / "vectors.sqlite")
            stores.append(sqlite)
            return VectorCache(sqlite)
        store = RedisStore.from_url(redis_server.url, prefix=prefix)
        stores.append(store)
        return VectorCache(store)

    try:
        first = guarded(openai_server, clock, fallback=False, cache=cache())
        vectors = first.embed_documents(DOCS)
        before = len(openai_server.embedding_requests)  # type: ignore[attr-defined]
        second = guarded(openai_server, clock, fallback=False, cache=cache())
        assert second.embed_documents(DOCS) == vectors
        assert len(openai_server.embedding_requests) == before  # type: ignore[attr-defined]
    finally:
        for store in stores:
            store.close()


def test_a_fallback_of_another_model_is_refused_unless_declared_compatible(
    openai_server: OpenAICompatServer,
) -> None:
    inner = openai_embeddings(openai_server)
    other = openai_embeddings(openai_server, model="text-embedding-3-large")
    with pytest.raises(ValueError, match="cannot be mixed"):
        CircuitBreakerEmbeddings(inner=inner, fallback=other)
    sized = openai_embeddings(openai_server, dimensions=256)
    with pytest.raises(ValueError, match="256-dimensional"):
        CircuitBreakerEmbeddings(
            inner=openai_embeddings(openai_server, dimensions=512), fallback=sized
        )
    accepted = CircuitBreakerEmbeddings(inner=inner, fallback=other, compatible=True)
    assert accepted.fallback_keys == ("openai::text-embedding-3-large",)


async def test_a_fallback_answering_another_dimension_is_a_failure_never_mixed_in(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    embeddings = CircuitBreakerEmbeddings(
        inner=openai_embeddings(openai_server),
        fallback=[
            openai_embeddings(openai_server, dimensions=16),
            DeterministicFakeEmbedding(size=8),
        ],
        compatible=True,
        fallback_keys=["backup::a", "backup::b"],
        policy=CallPolicy(clock=clock),
    )
    first = await _embed(embeddings, mode, ["one"])
    assert len(first[0]) == 8
    openai_server.push_embeddings(Fail(500))  # type: ignore[attr-defined]
    answer = await _embed(embeddings, mode, ["two"])
    assert len(answer[0]) == 8, "the 16-dimensional answer was refused; the next one served"
    assert embeddings.policy.metrics()["backup::a"].failure_count == 1

    only_wrong = CircuitBreakerEmbeddings(
        inner=openai_embeddings(openai_server),
        fallback=openai_embeddings(openai_server, dimensions=16),
        fallback_keys=["backup::a"],
        policy=CallPolicy(clock=clock),
    )
    await _embed(only_wrong, mode, ["one"])
    openai_server.push_embeddings(Fail(500))  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="16-dimensional vectors where"):
        await _embed(only_wrong, mode, ["three"])


async def test_every_model_named_when_all_fail(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    embeddings = CircuitBreakerEmbeddings(
        inner=openai_embeddings(openai_server),
        fallback=[openai_embeddings(openai_server), openai_embeddings(openai_server)],
        fallback_keys=["backup::a", "backup::b"],
        policy=CallPolicy(clock=clock),
    )
    openai_server.push_embeddings(Fail(500), Fail(502), Fail(503))  # type: ignore[attr-defined]
    with pytest.raises(AllModelsFailedError) as caught:
        await _embed(embeddings, mode, ["x"])
    assert caught.value.keys == (KEY, "backup::a", "backup::b")


async def test_the_budget_counts_tokens_and_a_hit_costs_nothing(
    openai_server: OpenAICompatServer, clock: FakeClock, mode: str
) -> None:
    budget = Budget(max_calls=1)
    embeddings = guarded(openai_server, clock, fallback=False, budget=budget)
    await _embed(embeddings, mode, DOCS)
    usage = budget.usage()
    assert usage.calls == 1
    assert usage.input_tokens > 0
    assert len(await _embed(embeddings, mode, DOCS)) == 4, "all cached: no budget needed"
    with pytest.raises(BudgetExceededError):
        await _embed(embeddings, mode, ["a new text"])


async def _embed(embeddings: CircuitBreakerEmbeddings, mode: str, texts: list[str]) -> Any:
    if mode == "sync":
        return embeddings.embed_documents(texts)
    return await embeddings.aembed_documents(texts)


def test_bad_arguments_are_named() -> None:
    inner = DeterministicFakeEmbedding(size=4)
    with pytest.raises(TypeError, match="inner: expected a LangChain Embeddings"):
        CircuitBreakerEmbeddings(inner="text-embedding-3-small")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"fallback\[1\]"):
        CircuitBreakerEmbeddings(inner=inner, fallback=[inner.model_copy(), 3])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"cache: expected a callpolicy\.VectorCache"):
        CircuitBreakerEmbeddings(inner=inner, cache=MemoryCacheBackend())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fallback_keys"):
        CircuitBreakerEmbeddings(inner=inner, fallback=[inner.model_copy()], fallback_keys=[])


finite = st.floats(allow_nan=False, width=64)


# No deadline: the machines are shared, and a loaded one takes longer than the default 200 ms.
@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(vector=st.lists(finite, min_size=1, max_size=64), text=st.text())
def test_vectors_round_trip_exactly_through_json(
    vector: list[float], text: str, tmp_path: Path
) -> None:
    for backend in (MemoryCacheBackend(), SQLiteCacheBackend(tmp_path / "round.sqlite")):
        cache = VectorCache(backend)
        cache.put("acme::embed", "document", [text], [vector])
        (found,) = cache.get("acme::embed", "document", [text])
        assert found is not None
        assert [math.copysign(1, x) for x in found] == [math.copysign(1, x) for x in vector]
        assert found == vector
        if isinstance(backend, SQLiteCacheBackend):
            backend.close()


def test_the_key_holds_the_model_and_a_hash_never_the_text_or_a_secret() -> None:
    key = VectorCache.key("openai::text-embedding-3-small", "document", "my secret text")
    assert "secret" not in key
    assert key != VectorCache.key("openai::text-embedding-3-large", "document", "my secret text")
    assert key != VectorCache.key("openai::text-embedding-3-small", "query", "my secret text")
