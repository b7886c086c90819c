"""``CircuitBreakerEmbedding``: a LlamaIndex ``BaseEmbedding`` guarded by the engine.

LlamaIndex's public embedding methods (``get_text_embedding_batch``, ``get_query_embedding``
and their async pairs) batch, fire the instrumentation events and call the private
``_get_*`` methods; the wrapper implements those, so a call shows one set of events (the
wrapper's, as for any embedding model), and hands :class:`callpolicy.EmbeddingGuard`
callables that call the inner model's (or a fallback's) own private methods: one model
call for the texts the vector cache misses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from pydantic import Field, PrivateAttr, SkipValidation, field_validator, model_validator

from callpolicy import Budget, CallPolicy, EmbeddingGuard, EngineOptions, ModelGuard, VectorCache

from ._models import model_checker

if TYPE_CHECKING:
    from callpolicy import CircuitState

__all__ = ["CircuitBreakerEmbedding", "embedding_identity"]

_SIZE_ATTRIBUTES = ("dimensions", "embed_dim", "dimension")


def embedding_identity(model: BaseEmbedding) -> tuple[str, str, int | None]:
    """``(provider, model name, dimensions or None)`` of a LlamaIndex embedding model: its
    class name lowercased without the ``Embedding`` suffix (``OpenAIEmbedding`` ->
    ``openai``), its ``model_name``, and its ``dimensions``/``embed_dim`` when set."""
    cls = type(model).__name__
    provider = cls.lower().removesuffix("embeddings").removesuffix("embedding") or cls.lower()
    name = model.model_name if isinstance(model.model_name, str) and model.model_name else cls
    size = next(filter(_is_size, (getattr(model, attr, None) for attr in _SIZE_ATTRIBUTES)), None)
    return provider, name, size


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


class CircuitBreakerEmbedding(BaseEmbedding, EngineOptions):
    """A LlamaIndex embedding model guarded by a circuit breaker, with optional retry,
    equivalent fallbacks, a budget and a per-text vector cache; use it wherever LlamaIndex
    takes an embedding model (``Settings.embed_model``, ``VectorStoreIndex``).

    Every batch LlamaIndex asks for (``embed_batch_size`` texts, the inner model's by
    default) and every query goes through :class:`callpolicy.EmbeddingGuard`: texts found
    in ``cache`` are not embedded again; the misses, each once, are embedded in one call of
    the inner model under its ``provider::model`` circuit, with the engine's retry,
    budget and fallbacks, and cached only once that call succeeded.

    Args:
        inner: the guarded embedding model (turn its own retries off: ``max_retries=0``).
        fallback: an equivalent model, or a list tried in order. A fallback whose
            ``model_name`` or dimensions differ from the inner model's is refused here
            unless ``compatible=True`` (vectors of different models cannot share an index);
            an answer of another dimension than the first one seen is a failure anyway.
        compatible: the caller's word that the fallbacks' vectors are interchangeable.
        key, fallback_keys: circuit keys; derived when not given (a fallback with the
            inner model's own derived key runs unguarded unless ``fallback_keys`` names it).
        policy: an engine to share, or the engine options (``failure_threshold``, ...).
        budget: a :class:`callpolicy.Budget` (a call counts its texts' estimated tokens).
        cache: a :class:`callpolicy.VectorCache` (memory, SQLite, Redis).

    ``model_name`` and ``embed_batch_size`` default to the inner model's.
    """

    inner: BaseEmbedding = Field(frozen=True, description="The guarded embedding model.")
    fallback: BaseEmbedding | list[BaseEmbedding] | None = Field(
        default=None, frozen=True, description="Equivalent models, tried in order."
    )
    compatible: bool = Field(default=False, frozen=True)
    key: str | None = Field(default=None, frozen=True)
    fallback_keys: list[str] | None = Field(default=None, frozen=True)
    policy: SkipValidation[CallPolicy | None] = Field(default=None, frozen=True, exclude=True)
    budget: SkipValidation[Budget | None] = Field(default=None, frozen=True, exclude=True)
    cache: SkipValidation[VectorCache | None] = Field(default=None, frozen=True, exclude=True)

    # The engine options are EngineOptions' fields.

    _guard: EmbeddingGuard = PrivateAttr()
    _fallbacks: tuple[BaseEmbedding, ...] = PrivateAttr(default=())

    @model_validator(mode="before")
    @classmethod
    def _inherit_from_inner(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("inner"), BaseEmbedding):
            inner = data["inner"]
            inherited = {"model_name": inner.model_name, "embed_batch_size": inner.embed_batch_size}
            data = {**{k: v for k, v in inherited.items() if k not in data}, **data}
        return data

    @field_validator("inner", "fallback", mode="before")
    @classmethod
    def _check_model(cls, value: Any, info: Any) -> Any:
        return ModelGuard.fallback_argument(str(info.field_name), value, _checked)

    def model_post_init(self, context: Any, /) -> None:
        super().model_post_init(context)
        fallbacks = ModelGuard.fallback_models(self.fallback)
        self._guard = EmbeddingGuard.of(
            self.inner,
            fallbacks,
            identity=embedding_identity,
            key=self.key,
            fallback_keys=self.fallback_keys,
            compatible=self.compatible,
            policy=self.policy,
            options=self,
            budget=self.budget,
            cache=self.cache,
            owner=type(self).__name__,
        )
        self.__dict__.update(policy=self._guard.policy, key=self._guard.key)
        self._fallbacks = tuple(fallbacks)

    @classmethod
    def class_name(cls) -> str:
        return "CircuitBreakerEmbedding"

    @property
    def guarded_fallback_keys(self) -> tuple[str | None, ...]:
        """The fallbacks' circuit keys, in order (None: unguarded)."""
        return self._guard.fallback_keys

    def state_for(self, key: str | None = None) -> CircuitState:
        """The circuit state of the inner model (or of ``key``)."""
        assert self.policy is not None
        return self.policy.state(key or self._guard.key)

    # -- what BaseEmbedding's public methods call --------------------------------------
    def _get_query_embedding(self, query: str) -> Embedding:
        return self._guard.embed(
            "query",
            [query],
            lambda texts: [self.inner._get_query_embedding(texts[0])],
            [_query(model) for model in self._fallbacks],
        )[0]

    async def _aget_query_embedding(self, query: str) -> Embedding:
        vectors = await self._guard.aembed(
            "query",
            [query],
            _aquery(self.inner),
            [_aquery(model) for model in self._fallbacks],
        )
        return vectors[0]

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._get_text_embeddings([text])[0]

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return (await self._aget_text_embeddings([text]))[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._guard.embed(
            "document",
            texts,
            self.inner._get_text_embeddings,
            [model._get_text_embeddings for model in self._fallbacks],
        )

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return await self._guard.aembed(
            "document",
            texts,
            self.inner._aget_text_embeddings,
            [model._aget_text_embeddings for model in self._fallbacks],
        )


_checked: Callable[[str, Any], BaseEmbedding] = model_checker(
    BaseEmbedding,
    "a LlamaIndex embedding model (BaseEmbedding)",
    "a LangChain model: guard it with langchain_breaker.CircuitBreakerEmbeddings",
)


def _query(model: BaseEmbedding) -> Any:
    return lambda texts: [model._get_query_embedding(texts[0])]


def _aquery(model: BaseEmbedding) -> Any:
    async def embed(texts: list[str]) -> list[Embedding]:
        return [await model._aget_query_embedding(texts[0])]

    return embed
