"""The engine's side of a guarded embedding model, shared by the LangChain and LlamaIndex
adapters: the per-text vector cache outermost, then the policy (budget -> fallback ->
retry -> breaker) around *one* model call for the texts the cache did not have.

The adapters hand it callables that embed a list of texts; everything else is decided
here, once:

- every text is looked up first; only the misses (each distinct text once) are embedded,
  in one call, and only after that call succeeded are they cached: a batch that failed
  caches nothing, so nothing half-done is ever served as a success;
- an answer must have one vector per text, all of one dimension (the dimension of the
  first answer seen): a fallback that answers with vectors of another size is a failure,
  never mixed into an index.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from ._budget import Budget
from ._embed_cache import EmbedKind, VectorCache
from ._fallback import Fallbacks
from ._options import EngineOptions, policy_from_options
from ._policy import CallPolicy
from ._request import CallRequest
from ._types import circuit_key

__all__ = [
    "EmbedIdentity",
    "Embedder",
    "EmbeddingGuard",
    "equivalent_fallbacks",
    "fallback_circuits",
]

Embedder = Callable[[list[str]], Sequence[Sequence[float]]]
"""Embeds a list of texts: one vector per text, in order."""
AsyncEmbedder = Callable[[list[str]], Awaitable[Sequence[Sequence[float]]]]
EmbedIdentity = Callable[[Any], tuple[str, str, int | None]]
"""How an adapter reads an embedding model's ``(provider, model name, dimensions or
None)``."""
_NO_OPTIONS: Mapping[str, Any] = {}


class EmbeddingGuard:
    """One guarded embedding model: its circuit ``key``, its fallbacks' keys (``None``: an
    unguarded fallback), the budget and the vector cache.

    >>> from callpolicy import CallPolicy, VectorCache
    >>> guard = EmbeddingGuard(CallPolicy(), "acme::embed-1", cache=VectorCache())
    >>> calls = []
    >>> def embed(texts):
    ...     calls.append(list(texts))
    ...     return [[float(len(t)), 1.0] for t in texts]
    >>> guard.embed("document", ["a", "bb", "a"], embed, ())
    [[1.0, 1.0], [2.0, 1.0], [1.0, 1.0]]
    >>> guard.embed("document", ["bb", "ccc"], embed, ())
    [[2.0, 1.0], [3.0, 1.0]]
    >>> calls
    [['a', 'bb'], ['ccc']]
    """

    __slots__ = ("_dimension", "budget", "cache", "fallback_keys", "key", "policy")

    def __init__(
        self,
        policy: CallPolicy,
        key: str,
        *,
        fallback_keys: Sequence[str | None] = (),
        budget: Budget | None = None,
        cache: VectorCache | None = None,
    ) -> None:
        if budget is not None and not isinstance(budget, Budget):
            raise TypeError(f"budget: expected a callpolicy.Budget, got {type(budget).__name__}")
        if cache is not None and not isinstance(cache, VectorCache):
            raise TypeError(f"cache: expected a callpolicy.VectorCache, got {type(cache).__name__}")
        self.policy = policy
        self.key = key
        self.fallback_keys = tuple(fallback_keys)
        self.budget = budget
        self.cache = cache
        self._dimension: int | None = None
        if budget is not None:
            for model_key in (key, *self.fallback_keys):
                if model_key is not None:
                    budget.require_price(model_key)

    @classmethod
    def of(
        cls,
        inner: object,
        fallbacks: Sequence[object] = (),
        *,
        identity: EmbedIdentity,
        key: str | None = None,
        fallback_keys: Sequence[str] | None = None,
        compatible: bool = False,
        policy: CallPolicy | None = None,
        options: EngineOptions | Mapping[str, Any] = _NO_OPTIONS,
        budget: Budget | None = None,
        cache: VectorCache | None = None,
        owner: str = "EmbeddingGuard",
    ) -> EmbeddingGuard:
        """The guard of an embedding model and its fallbacks, as both adapters build it:
        keys derived with ``identity`` (or given), fallbacks that could not share an index
        refused unless ``compatible`` (see :func:`equivalent_fallbacks`), a fallback with
        a derived key already taken unguarded (see :func:`fallback_circuits`), the policy
        given or built from the engine ``options``."""
        fallbacks = list(fallbacks)
        if any(model is inner for model in fallbacks):
            raise ValueError("fallback: is the inner model itself; a model cannot back itself up")
        if not isinstance(compatible, bool):
            raise TypeError(f"compatible: expected a bool, got {type(compatible).__name__}")
        if key is not None and (not isinstance(key, str) or not key):
            raise TypeError(f"key: expected a non-empty string, got {key!r}")
        provider, name, size = identity(inner)
        key = key or circuit_key(provider, name)
        identities = [identity(model) for model in fallbacks]
        equivalent_fallbacks(
            (name, size), [(n, s) for _, n, s in identities], compatible=compatible
        )
        keys = fallback_circuits(key, [circuit_key(p, n) for p, n, _ in identities], fallback_keys)
        chosen = policy_from_options(policy, options, owner=owner)
        return cls(chosen, key, fallback_keys=keys, budget=budget, cache=cache)

    @staticmethod
    def identity_of(
        model: object, *, names: Sequence[str], sizes: Sequence[str]
    ) -> tuple[str, str, int | None]:
        """``(provider, model name, dimensions or None)`` of an embedding model, read as
        both adapters read it: its class name lowercased without an ``Embedding(s)``
        suffix (``OpenAIEmbeddings`` -> ``openai``), the first of its ``names``
        attributes holding a string (else its class name), and the first of its ``sizes``
        attributes holding a positive int.

        >>> class AcmeEmbeddings:
        ...     model, dimensions = "embed-1", 256
        >>> EmbeddingGuard.identity_of(AcmeEmbeddings(), names=["model"], sizes=["dimensions"])
        ('acme', 'embed-1', 256)
        """
        cls = type(model).__name__
        provider = cls.lower().removesuffix("embeddings").removesuffix("embedding") or cls.lower()
        found = (getattr(model, attribute, None) for attribute in names)
        name = next((value for value in found if isinstance(value, str) and value), cls)
        size = next(
            (
                value
                for value in (getattr(model, attribute, None) for attribute in sizes)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0
            ),
            None,
        )
        return provider, name, size

    # -- embedding: one body of decisions, two drivers (the cache's reads awaited) ----------
    def embed(
        self,
        kind: EmbedKind,
        texts: Sequence[str],
        call: Embedder,
        fallbacks: Sequence[Embedder],
    ) -> list[list[float]]:
        """Each text's vector: from the cache, or from one guarded call for the misses."""
        texts, cache = _texts(texts), self.cache
        found = _unknown(texts) if cache is None or not texts else cache.get(self.key, kind, texts)
        misses = _misses(texts, found)
        computed: dict[str, list[float]] = {}
        if misses:
            vectors = self._guarded(self.policy.execute, misses, call, fallbacks, False)
            if cache is not None:
                cache.put(self.key, kind, misses, vectors)
            computed = dict(zip(misses, vectors, strict=True))
        return _filled(texts, found, computed)

    async def aembed(
        self,
        kind: EmbedKind,
        texts: Sequence[str],
        call: AsyncEmbedder,
        fallbacks: Sequence[AsyncEmbedder],
    ) -> list[list[float]]:
        """Async :meth:`embed`."""
        texts, cache = _texts(texts), self.cache
        found = _unknown(texts)
        if cache is not None and texts:
            found = await cache.aget(self.key, kind, texts)
        misses = _misses(texts, found)
        if not misses:
            return _filled(texts, found, {})
        vectors = await self._guarded(self.policy.aexecute, misses, call, fallbacks, True)
        if cache is not None:
            await cache.aput(self.key, kind, misses, vectors)
        return _filled(texts, found, dict(zip(misses, vectors, strict=True)))

    def _guarded(
        self,
        execute: Callable[..., Any],
        misses: list[str],
        call: Callable[[list[str]], Any],
        fallbacks: Sequence[Callable[[list[str]], Any]],
        asynchronous: bool,
    ) -> Any:
        """One guarded call for the ``misses``, through ``execute`` (the policy's execute,
        or aexecute: then the embedders return awaitables, and so does this): the inner
        model, the fallbacks per the policy, the budget; each answer checked."""

        def checked(embedder: Callable[[list[str]], Any]) -> Callable[[], Any]:
            if not asynchronous:
                return lambda: self._checked(misses, embedder(list(misses)))

            async def run() -> list[list[float]]:
                return self._checked(misses, await embedder(list(misses)))

            return run

        plan, plan_key = self._plan([checked(fallback) for fallback in fallbacks])
        if self.budget is None:
            return execute(self.key, checked(call), fallback=plan, fallback_key=plan_key)
        return execute(
            self.key,
            checked(call),
            fallback=plan,
            fallback_key=plan_key,
            budget=self.budget,
            request=_request(misses),
        )

    # -- shared ----------------------------------------------------------------------------
    def _plan(self, calls: list[Any]) -> tuple[Any, str | None]:
        if not calls:
            return None, None
        if len(calls) != len(self.fallback_keys):
            raise ValueError("fallbacks: expected one embedder per fallback key")
        if len(calls) == 1:
            return calls[0], self.fallback_keys[0]
        return Fallbacks(list(zip(self.fallback_keys, calls, strict=True))), None

    def _checked(self, texts: list[str], vectors: Any) -> list[list[float]]:
        """``vectors`` as lists of floats, if there is one per text, all of one dimension
        (the first answer's); else a ValueError (a failure of the model that answered)."""
        try:
            found = [[float(x) for x in vector] for vector in vectors]
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"embeddings: the model answered something not vectors ({exc})"
            ) from None
        if len(found) != len(texts):
            raise ValueError(
                f"embeddings: the model answered {len(found)} vectors for {len(texts)} texts"
            )
        sizes = {len(vector) for vector in found}
        if len(sizes) != 1 or 0 in sizes:
            raise ValueError(f"embeddings: the model answered vectors of sizes {sorted(sizes)}")
        size = sizes.pop()
        if self._dimension is None:
            self._dimension = size
        elif size != self._dimension:
            raise ValueError(
                f"embeddings: the model answered {size}-dimensional vectors where this "
                f"embedding model's are {self._dimension}-dimensional; vectors of different "
                "models cannot be mixed in one index"
            )
        return found


def equivalent_fallbacks(
    primary: tuple[str, int | None],
    fallbacks: Sequence[tuple[str, int | None]],
    *,
    compatible: bool,
) -> None:
    """Refuse fallbacks whose vectors could not share an index with the primary's: another
    model name, or other dimensions (when both are known), unless ``compatible``.

    >>> equivalent_fallbacks(("m", 8), [("m", None)], compatible=False)
    >>> equivalent_fallbacks(("m", 8), [("other", 8)], compatible=False)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: fallback: model 'other' is not the inner model 'm': ...
    """
    name, size = primary
    for index, (other, other_size) in enumerate(fallbacks):
        where = "fallback" if len(fallbacks) == 1 else f"fallback[{index}]"
        if compatible:
            continue
        if other != name:
            raise ValueError(
                f"{where}: model {other!r} is not the inner model {name!r}: vectors of "
                "different models cannot be mixed in one index; pass compatible=True if "
                "they are interchangeable"
            )
        if size is not None and other_size is not None and size != other_size:
            raise ValueError(
                f"{where}: {other_size}-dimensional vectors, the inner model's are "
                f"{size}-dimensional; pass compatible=True only if they are interchangeable"
            )


def fallback_circuits(
    key: str, derived: list[str], given: Sequence[str] | None
) -> tuple[str | None, ...]:
    """Each fallback's circuit: as given, else derived; a derived key that is the inner
    model's (or an earlier fallback's) runs unguarded rather than share that circuit."""
    if given is not None:
        names = list(given)
        if len(names) != len(derived):
            raise ValueError(
                f"fallback_keys: expected one key per fallback ({len(derived)}), got {len(names)}"
            )
        for index, name in enumerate(names):
            if not isinstance(name, str) or not name:
                raise TypeError(f"fallback_keys[{index}]: expected a non-empty string")
        if len({key, *names}) != len(names) + 1:
            raise ValueError("fallback_keys: each must differ from key and from each other")
        return tuple(names)
    taken = {key}
    keys: list[str | None] = []
    for name in derived:
        keys.append(None if name in taken else name)
        taken.add(name)
    return tuple(keys)


def _texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts: expected a list of strings, got one string")
    found = list(texts)
    for index, text in enumerate(found):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}]: expected a string, got {type(text).__name__}")
    return found


def _unknown(texts: list[str]) -> list[list[float] | None]:
    """No text's vector known (no cache, or nothing to look up)."""
    return [None] * len(texts)


def _misses(texts: list[str], found: list[list[float] | None]) -> list[str]:
    """The texts without a cached vector, each once, in order of first appearance."""
    return list(dict.fromkeys(t for t, v in zip(texts, found, strict=True) if v is None))


def _filled(
    texts: list[str], found: list[list[float] | None], computed: dict[str, list[float]]
) -> list[list[float]]:
    return [
        vector if vector is not None else computed[text]
        for text, vector in zip(texts, found, strict=True)
    ]


def _request(texts: list[str]) -> CallRequest[list[list[float]]]:
    """The call as the budget sees it: its input, for the token estimate (an embeddings
    answer reports no usage through these interfaces: it counts by its estimate)."""
    return CallRequest(describe=lambda: {"texts": texts}, input_text=lambda: "\n".join(texts))
