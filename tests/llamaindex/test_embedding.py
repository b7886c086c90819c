"""``CircuitBreakerEmbedding`` with llama-index's real ``OpenAIEmbedding`` over HTTP against
the loopback server's ``/v1/embeddings``: a ``VectorStoreIndex`` built and queried through
an embeddings outage and a 429 storm, the vector cache proven by the request count."""

from __future__ import annotations

from typing import Any

import pytest
from llama_index.core import Document, VectorStoreIndex
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.schema import TextNode
from llama_index.embeddings.openai import OpenAIEmbedding

from callpolicy import CallPolicy, CircuitState, EmbeddingGuard, RetryPolicy, VectorCache
from llamaindex_breaker import CircuitBreakerEmbedding
from llamaindex_breaker._embedding import embedding_identity
from tests.support.clock import FakeClock, FakeSleeper
from tests.support.http_clients import HttpClients
from tests.support.openai_server import Fail, OpenAICompatServer

MODEL = "text-embedding-3-small"
KEY, BACKUP_KEY = f"openai::{MODEL}", f"openai-backup::{MODEL}"
DOCS = ["the cat sat on the mat", "dogs chase cats", "a treatise on mats", "rain in Spain"]


def openai_embedding(server: OpenAICompatServer, http: HttpClients, **options: Any) -> Any:
    options.setdefault("model", MODEL)
    return OpenAIEmbedding(
        api_base=server.base_url,
        api_key="sk-test",
        max_retries=0,
        timeout=5.0,
        http_client=http.sync(),
        async_http_client=http.asynchronous(),
        **options,
    )


def guarded(
    server: OpenAICompatServer,
    http: HttpClients,
    clock: FakeClock,
    *,
    fallback: bool = True,
    retry: RetryPolicy | None = None,
    failure_threshold: int = 2,
) -> CircuitBreakerEmbedding:
    sleeper = FakeSleeper(clock)
    return CircuitBreakerEmbedding(
        inner=openai_embedding(server, http),
        fallback=openai_embedding(server, http) if fallback else None,
        fallback_keys=[BACKUP_KEY] if fallback else None,
        cache=VectorCache(),
        policy=CallPolicy(
            clock=clock,
            sleep=sleeper,
            async_sleep=sleeper.asleep,
            failure_threshold=failure_threshold,
            retry=retry,
        ),
    )


async def build_and_query(embed: BaseEmbedding, mode: str, query: str = "cats") -> list[str]:
    documents = [Document(text=text) for text in DOCS]
    if mode == "sync":
        index = VectorStoreIndex.from_documents(documents, embed_model=embed)
        nodes = index.as_retriever(similarity_top_k=2).retrieve(query)
    else:
        # from_documents(use_async=True) runs its own event loop, which leaves the async
        # client's connections on a closed loop: insert from this one instead.
        index = VectorStoreIndex([], embed_model=embed)
        await index.ainsert_nodes([TextNode(text=text) for text in DOCS])
        nodes = await index.as_retriever(similarity_top_k=2).aretrieve(query)
    return [node.get_content() for node in nodes]


def requests(server: OpenAICompatServer) -> int:
    return len(server.embedding_requests)  # type: ignore[attr-defined]


async def test_an_index_is_built_and_queried_through_an_embeddings_outage(
    openai_server: OpenAICompatServer, http_clients: HttpClients, clock: FakeClock, mode: str
) -> None:
    server = openai_server
    baseline = await build_and_query(openai_embedding(server, http_clients), mode)
    embed = guarded(server, http_clients, clock, failure_threshold=1)
    before = requests(server)
    server.push_embeddings(Fail(503))  # type: ignore[attr-defined]
    assert await build_and_query(embed, mode) == baseline
    assert embed.state_for() is CircuitState.OPEN
    assert embed.policy is not None
    assert embed.policy.metrics()[BACKUP_KEY].successes >= 2  # the documents and the query
    assert requests(server) - before == 1 + embed.policy.metrics()[BACKUP_KEY].successes

    # Built again from the same documents, asked the same: all from the cache.
    before = requests(server)
    assert await build_and_query(embed, mode) == baseline
    assert requests(server) == before


async def test_a_429_storm_is_retried_and_each_text_embedded_once(
    openai_server: OpenAICompatServer, http_clients: HttpClients, clock: FakeClock, mode: str
) -> None:
    server = openai_server
    embed = guarded(
        server,
        http_clients,
        clock,
        fallback=False,
        failure_threshold=5,
        retry=RetryPolicy(max_attempts=4, jitter=0),
    )
    slow_down = Fail(429, "rate limited", headers={"retry-after": "1"})
    server.push_embeddings(slow_down, slow_down)  # type: ignore[attr-defined]
    assert len(await build_and_query(embed, mode)) == 2
    assert embed.policy is not None
    assert embed.policy.metrics()[KEY].retries == 2
    embedded = server.embedded_texts  # type: ignore[attr-defined]
    assert embedded.count(DOCS[0]) == 3  # two refusals, then the answer: nothing more
    before = requests(server)
    assert len(await build_and_query(embed, mode)) == 2
    assert requests(server) == before


def test_a_fallback_with_the_inner_key_follows_the_engines_rule() -> None:
    # The rule is the engine's (EmbeddingGuard.of), the same for LangChain's wrapper: an
    # equivalent model whose derived key is the inner model's (the same model at another
    # endpoint) runs unguarded unless fallback_keys names its circuit; a named key must
    # differ from the inner model's.
    inner, other = (MockEmbedding(embed_dim=8, model_name="m") for _ in range(2))
    wrapper = CircuitBreakerEmbedding(inner=inner, fallback=other)
    piece = EmbeddingGuard.of(inner, [other], identity=embedding_identity)
    assert wrapper.guarded_fallback_keys == piece.fallback_keys == (None,)
    named = CircuitBreakerEmbedding(inner=inner, fallback=other, fallback_keys=["mock-eu::m"])
    assert named.guarded_fallback_keys == ("mock-eu::m",)
    with pytest.raises(ValueError, match="fallback_keys: each must differ from key"):
        CircuitBreakerEmbedding(inner=inner, fallback=other, fallback_keys=["mock::m"])


def test_fallbacks_must_be_the_same_model_unless_declared_compatible() -> None:
    inner = MockEmbedding(embed_dim=8, model_name="m-small")
    with pytest.raises(ValueError, match="cannot be mixed"):
        CircuitBreakerEmbedding(
            inner=inner, fallback=MockEmbedding(embed_dim=8, model_name="m-large")
        )
    with pytest.raises(ValueError, match="16-dimensional"):
        CircuitBreakerEmbedding(
            inner=inner, fallback=MockEmbedding(embed_dim=16, model_name="m-small")
        )
    ok = CircuitBreakerEmbedding(
        inner=inner, fallback=MockEmbedding(embed_dim=8, model_name="m-large"), compatible=True
    )
    assert ok.guarded_fallback_keys == ("mock::m-large",)
    assert ok.model_name == "m-small"
    with pytest.raises(TypeError, match="inner: expected a LlamaIndex embedding model"):
        CircuitBreakerEmbedding(inner="m-small")
