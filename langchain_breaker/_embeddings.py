"""``CircuitBreakerEmbeddings``: a LangChain ``Embeddings`` guarded by the engine.

The adapter only hands :class:`callpolicy.EmbeddingGuard` callables that embed a list of
texts with the inner model (or a fallback); the guard decides the rest (vector cache,
budget, fallback, retry, breaker) once for both frameworks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.embeddings import Embeddings

from callpolicy import (
    Budget,
    CallPolicy,
    CircuitState,
    EmbeddingGuard,
    VectorCache,
    takes_engine_options,
)

__all__ = ["CircuitBreakerEmbeddings", "embeddings_identity"]

_NAME_ATTRIBUTES = ("model", "model_name", "deployment", "model_id")
_SIZE_ATTRIBUTES = ("dimensions", "dimension", "embed_dim", "size")


def embeddings_identity(model: Embeddings) -> tuple[str, str, int | None]:
    """``(provider, model name, dimensions or None)`` of a LangChain embeddings model: the
    class name lowercased without its ``Embeddings`` suffix (``OpenAIEmbeddings`` ->
    ``openai``), its ``model``/``model_name``/``deployment`` attribute (else its class
    name), and its ``dimensions``/``size`` attribute when it has one."""
    return EmbeddingGuard.identity_of(model, names=_NAME_ATTRIBUTES, sizes=_SIZE_ATTRIBUTES)


class CircuitBreakerEmbeddings(Embeddings):
    """A LangChain ``Embeddings`` that calls ``inner`` through a circuit breaker, with
    optional retry, fallbacks, a budget and a per-text vector cache.

    ``embed_documents``, ``embed_query``, ``aembed_documents`` and ``aembed_query`` go
    through :class:`callpolicy.EmbeddingGuard`: each text is looked up in ``cache`` first
    (every text embedded once, across calls and processes); the texts it misses, each
    once, are embedded in **one** call of the inner model, under the circuit of its
    ``provider::model`` key, with the engine's retry, budget and fallbacks; only once that
    call succeeded are its vectors cached (a batch that failed caches nothing).

    Args:
        inner: the guarded embeddings model. Give it ``max_retries=0`` (or few).
        fallback: an equivalent model (or a list, tried in order) answering when the inner
            model's circuit is open or it failed: the same model served elsewhere (another
            region, deployment or provider). Vectors of different models cannot be mixed
            in one index, so a fallback whose model name or dimensions differ from the
            inner model's is refused here, unless ``compatible=True``. Whatever that says,
            an answer whose vectors have another dimension than the first answer's is a
            failure, never returned.
        compatible: the caller's word that the fallbacks' vectors are interchangeable with
            the inner model's (e.g. one model under two names).
        key, fallback_keys: circuit keys (``provider::model``); derived when not given.
            A fallback with the inner model's own derived key (the same model at another
            endpoint, typically) runs unguarded unless ``fallback_keys`` names its circuit.
        policy: an engine to share; or the engine options below.
        budget: a :class:`callpolicy.Budget`; a call counts as one call and the estimated
            tokens of its texts (embeddings answers report no usage through LangChain).
            A cache hit costs nothing.
        cache: a :class:`callpolicy.VectorCache` (memory, SQLite or Redis backend); vectors
            are cached under the inner model's key, also when a fallback computed them.
        failure_threshold, ..., store: the engine's options (see :class:`callpolicy.CallPolicy`).

    >>> from langchain_core.embeddings import DeterministicFakeEmbedding
    >>> from callpolicy import VectorCache
    >>> embeddings = CircuitBreakerEmbeddings(
    ...     inner=DeterministicFakeEmbedding(size=4), cache=VectorCache()
    ... )
    >>> len(embeddings.embed_query("hello"))
    4
    >>> embeddings.state_for()
    <CircuitState.CLOSED: 'closed'>
    """

    @takes_engine_options
    def __init__(
        self,
        *,
        inner: Embeddings,
        fallback: Embeddings | Sequence[Embeddings] | None = None,
        compatible: bool = False,
        key: str | None = None,
        fallback_keys: Sequence[str] | None = None,
        policy: CallPolicy | None = None,
        budget: Budget | None = None,
        cache: VectorCache | None = None,
        **options: Any,
    ) -> None:
        if not isinstance(inner, Embeddings):
            raise TypeError(
                f"inner: expected a LangChain Embeddings model, got {type(inner).__name__}"
            )
        fallbacks = _fallback_list(fallback)
        self._guard = EmbeddingGuard.of(
            inner,
            fallbacks,
            identity=embeddings_identity,
            key=key,
            fallback_keys=fallback_keys,
            owner=type(self).__name__,
            compatible=compatible,
            policy=policy,
            options=options,
            budget=budget,
            cache=cache,
        )
        self.inner = inner
        self.fallbacks: tuple[Embeddings, ...] = tuple(fallbacks)
        """The fallbacks, in order."""
        self.key: str = self._guard.key
        """The inner model's circuit key (also the vector cache's model identity)."""
        self.fallback_keys: tuple[str | None, ...] = self._guard.fallback_keys
        """The fallbacks' circuit keys (None: unguarded)."""
        self.policy: CallPolicy = self._guard.policy

    @property
    def budget(self) -> Budget | None:
        return self._guard.budget

    @property
    def cache(self) -> VectorCache | None:
        return self._guard.cache

    def state_for(self, key: str | None = None) -> CircuitState:
        """The circuit state of the inner model (or of ``key``)."""
        return self.policy.state(key or self.key)

    # -- Embeddings ------------------------------------------------------------------------
    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self._guard.embed(
            "document",
            texts,
            self.inner.embed_documents,
            [model.embed_documents for model in self.fallbacks],
        )

    def embed_query(self, text: str) -> list[float]:
        return self._guard.embed(
            "query",
            [_text(text)],
            _query(self.inner),
            [_query(model) for model in self.fallbacks],
        )[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return await self._guard.aembed(
            "document",
            texts,
            self.inner.aembed_documents,
            [model.aembed_documents for model in self.fallbacks],
        )

    async def aembed_query(self, text: str) -> list[float]:
        vectors = await self._guard.aembed(
            "query",
            [_text(text)],
            _aquery(self.inner),
            [_aquery(model) for model in self.fallbacks],
        )
        return vectors[0]

    def __repr__(self) -> str:
        keys = list(self.fallback_keys)
        return f"CircuitBreakerEmbeddings(key={self.key!r}, fallback_keys={keys!r})"


def _text(text: Any) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text: expected a string, got {type(text).__name__}")
    return text


def _query(model: Embeddings) -> Any:
    return lambda texts: [model.embed_query(texts[0])]


def _aquery(model: Embeddings) -> Any:
    async def embed(texts: list[str]) -> list[list[float]]:
        return [await model.aembed_query(texts[0])]

    return embed


def _fallback_list(fallback: Embeddings | Sequence[Embeddings] | None) -> list[Embeddings]:
    if fallback is None:
        return []
    given = [fallback] if isinstance(fallback, Embeddings) else list(fallback)
    for index, model in enumerate(given):
        if not isinstance(model, Embeddings):
            where = "fallback" if isinstance(fallback, Embeddings) else f"fallback[{index}]"
            raise TypeError(
                f"{where}: expected a LangChain Embeddings model, got {type(model).__name__}"
            )
    return given
