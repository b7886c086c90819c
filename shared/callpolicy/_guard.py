"""``ModelGuard``: what a wrapper of one model builds once and calls on every call.

A framework adapter (LangChain's chat model, LlamaIndex's LLM) wraps an inner model and
its fallbacks. Everything that is not about the framework is decided here, once for both:

- **keys**: the inner model's circuit key (``provider::model``, derived from the model by
  the adapter's ``identity`` function, or given), each fallback's, and the rules: keys are
  non-empty strings; ``fallback_key`` needs a fallback and names the only one; a model
  cannot back itself up; and no two models of a wrapper share a circuit. A fallback whose
  key is the inner model's is refused, naming ``fallback_key``/``key``: sharing the
  circuit would refuse the fallback exactly when the inner model is refused.
- **construction checks**: the budget and the cache are the engine's types; with a
  ``max_cost_usd`` budget every model has a price (an error naming the model now, not at
  its first call, or mid-outage at the fallback's); the policy is the one given or is
  built from the engine options (:func:`policy_from_options`).
- **routing per call**: a per-call ``model=`` override counts against that model's
  circuit (a model of the inner model's provider) and is not passed to the fallbacks.
- **the call**: :meth:`ModelGuard.execute` / :meth:`~ModelGuard.aexecute` and the guarded
  streams :meth:`~ModelGuard.stream` / :meth:`~ModelGuard.astream` hand the adapter's
  callables to :class:`CallPolicy` with the fallbacks' plan (one fallback, or a
  :class:`Fallbacks` list, each under its own circuit) and the budget and cache.

The adapter keeps what is framework-specific: how a model's ``(provider, name)`` is read,
how each model is called, the labels, callbacks and metadata of its runs, and how a
request is described for the cache (with :func:`describe_arguments` and the walkers of
:mod:`callpolicy._cache_key`).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, Union

from ._budget import Budget, MissingPriceError
from ._cache import ResponseCache
from ._errors import add_note
from ._fallback import Fallbacks
from ._options import EngineOptions, policy_from_options
from ._policy import CallPolicy
from ._request import CallRequest
from ._types import circuit_key, split_key

__all__ = ["Identity", "ModelGuard"]

T = TypeVar("T")

Identity = Callable[[Any], tuple[str, str]]
"""How an adapter reads a model's ``(provider, model name)``."""

_MAX_OVERRIDES = 256
_NO_OPTIONS: Mapping[str, Any] = {}

Markers = Union[Callable[[T], bool], Sequence[Callable[[T], bool] | None], None]  # noqa: UP007
"""End-marker checks of the fallbacks' streams: one for all, or one per fallback."""


class ModelGuard:
    """The policy, circuit keys, fallbacks, budget and cache of one wrapped model.

    Args:
        inner: the guarded model (any object: only ``identity`` reads it).
        fallbacks: the fallback models, in order (none, one, or several).
        identity: ``model -> (provider, model name)``, the adapter's way of naming a model.
        key, fallback_key: circuit keys (``provider::model``); derived when not given.
            ``fallback_key`` names the one fallback's circuit (with several, each key is
            derived from its model).
        policy: the engine to use; or None and ``options`` (an :class:`EngineOptions`,
            such as the wrapper itself, or a mapping of engine options).
        budget, cache: the engine's budget and response cache, if any.
        owner: the wrapper's class name, for error messages.

    Raises:
        TypeError: a key that is not a non-empty string, ``fallback_key`` with several
            fallbacks, ``policy`` with engine options, a budget or cache of another type.
        ValueError: a fallback that is the inner model, ``fallback_key`` without a
            fallback, two models of the wrapper with one circuit key.
        MissingPriceError: a ``max_cost_usd`` budget without a price for a model.

    >>> guard = ModelGuard("inner", ["backup"], identity=lambda m: ("acme", m))
    >>> guard.key, guard.fallback_keys
    ('acme::inner', ('acme::backup',))
    >>> guard.execute(guard.key_of({}), lambda: "hello", lambda index: "from the backup")
    'hello'
    >>> guard.key_of({"model": "large"})
    'acme::large'
    """

    __slots__ = (
        "_by_model",
        "budget",
        "cache",
        "described",
        "fallback_key",
        "fallback_keys",
        "fallback_names",
        "key",
        "model",
        "policy",
        "provider",
    )

    def __init__(
        self,
        inner: object,
        fallbacks: Sequence[object] = (),
        *,
        identity: Identity,
        key: str | None = None,
        fallback_key: str | None = None,
        policy: CallPolicy | None = None,
        options: EngineOptions | Mapping[str, Any] = _NO_OPTIONS,
        budget: Budget | None = None,
        cache: ResponseCache | None = None,
        owner: str = "ModelGuard",
    ) -> None:
        fallbacks = tuple(fallbacks)
        if any(model is inner for model in fallbacks):
            raise ValueError("fallback: is the inner model itself; a model cannot back itself up")
        if len(fallbacks) > 1 and fallback_key is not None:
            raise TypeError(
                "fallback_key: names one fallback's circuit; with a list of fallbacks each "
                "key is derived from its model (give models that differ)"
            )
        for name, value in (("key", key), ("fallback_key", fallback_key)):
            if value is not None and (not isinstance(value, str) or not value):
                raise TypeError(f"{name}: expected a non-empty string, got {value!r}")
        if not fallbacks and fallback_key is not None:
            raise ValueError("fallback_key: given without a fallback")
        if budget is not None and not isinstance(budget, Budget):
            raise TypeError(f"budget: expected a callpolicy.Budget, got {type(budget).__name__}")
        if cache is not None and not isinstance(cache, ResponseCache):
            raise TypeError(
                f"cache: expected a callpolicy.ResponseCache, got {type(cache).__name__}"
            )
        if key is None:
            self.provider, self.model = identity(inner)
            self.key = circuit_key(self.provider, self.model)
        else:
            self.provider, self.model = split_key(key)
            self.key = key
        """The inner model's circuit key; :attr:`provider` and :attr:`model` its parts."""
        self._by_model: dict[str, str] = {self.model: self.key}
        identities = [identity(model) for model in fallbacks]
        self.fallback_names: tuple[str, ...] = tuple(name for _, name in identities)
        """Each fallback's model name (as ``identity`` reads it), in order."""
        self.fallback_keys: tuple[str, ...] = _fallback_keys(self.key, identities, fallback_key)
        """Each fallback's circuit key, in order."""
        self.fallback_key: str | None = self.fallback_keys[0] if fallbacks else None
        """The first fallback's circuit key (None without a fallback)."""
        self.budget = budget
        self.cache = cache
        self.described = budget is not None or cache is not None
        """Whether calls need a :class:`CallRequest` (for the budget or the cache; without
        them the adapter never builds one, so the plain path never pays for it)."""
        if budget is not None:
            self._require_prices(budget, owner)
        self.policy = policy_from_options(policy, options, owner=owner)

    def _require_prices(self, budget: Budget, owner: str) -> None:
        """With ``max_cost_usd``, every model the wrapper meters must have a price: fail
        now, naming the model, rather than at its first call (or mid-outage)."""
        several = len(self.fallback_keys) > 1
        named = [("inner", self.key)] + [
            (f"fallback[{index}]" if several else "fallback", key)
            for index, key in enumerate(self.fallback_keys)
        ]
        for argument, key in named:
            try:
                budget.require_price(key)
            except MissingPriceError as exc:
                add_note(exc, f"budget: the {argument} model of {owner} has no price")
                raise

    # -- checks of a wrapper's arguments (before a guard is built) -----------------------
    @staticmethod
    def fallback_argument(
        argument: str, value: Any, check: Callable[[str, Any], T]
    ) -> T | list[T] | None:
        """A wrapper's ``inner`` or ``fallback`` argument, each model checked by
        ``check(argument, model)`` (which names the argument in its error): a fallback
        may be None or a list (``fallback[i]``; one model: that model; empty: an error).

        >>> ModelGuard.fallback_argument("fallback", ["a", "b"], lambda _where, m: m.upper())
        ['A', 'B']
        """
        if argument == "fallback":
            if value is None:
                return None
            if isinstance(value, (list, tuple)):
                models = [check(f"fallback[{i}]", item) for i, item in enumerate(value)]
                if not models:
                    raise ValueError("fallback: an empty list; give None for no fallback")
                return models[0] if len(models) == 1 else models
        return check(argument, value)

    @staticmethod
    def fallback_models(fallback: T | list[T] | None) -> list[T]:
        """The fallbacks in order, from a wrapper's ``fallback`` (none, one, or a list)."""
        if fallback is None:
            return []
        return list(fallback) if isinstance(fallback, list) else [fallback]

    @staticmethod
    def check_finished(argument: str, value: Any) -> Any:
        """A wrapper's ``stream_finished``-like option: ``"auto"`` (the adapter recognises
        its integrations' end markers), a function of one chunk, or None; else a
        TypeError naming ``argument``."""
        if value is None or value == "auto" or callable(value):
            return value
        raise TypeError(
            f'{argument}: expected "auto", None or a function of one chunk returning True for '
            f"the chunk carrying the provider's end marker, got {type(value).__name__}"
        )

    # -- routing per call --------------------------------------------------------------
    def for_model(self, model: str | None) -> str:
        """The circuit key of ``model`` (a model name of the inner model's provider, as a
        per-call ``model=`` override names it); the inner model's when None."""
        if model is None:
            return self.key
        key = self._by_model.get(model)
        if key is None:
            key = circuit_key(self.provider, model)
            if len(self._by_model) < _MAX_OVERRIDES:  # names come from callers: stay bounded
                self._by_model[model] = key
        return key

    def key_of(self, kwargs: Mapping[str, Any]) -> str:
        """The circuit of a call with these kwargs: the inner model's, or a per-call
        ``model=`` override's."""
        model = kwargs.get("model") if kwargs else None
        return self.for_model(model) if isinstance(model, str) else self.key

    @staticmethod
    def fallback_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
        """A call's kwargs for the fallbacks: a ``model=`` override names a model of the
        inner model's provider, not theirs."""
        if "model" not in kwargs:
            return kwargs
        return {name: value for name, value in kwargs.items() if name != "model"}

    # -- the engine's fallback plan ----------------------------------------------------
    def fallback_plan(
        self, on: Callable[[int], T], indices: Sequence[int] | None = None
    ) -> tuple[Callable[[], T] | Fallbacks[T] | None, str | None]:
        """The engine's ``fallback`` and ``fallback_key`` for one call: ``on(index)``
        calls fallback number ``index`` (of :attr:`fallback_keys`); ``indices`` chooses
        which fallbacks serve this call (all by default). One fallback is one callable
        under its key; several are a :class:`Fallbacks` list, each under its own."""
        if indices is None and len(self.fallback_keys) == 1:
            # The common case, on every call of a wrapper with one fallback: no index walk.
            return functools.partial(on, 0), self.fallback_key
        chosen: Sequence[int] = range(len(self.fallback_keys)) if indices is None else indices
        if not chosen:
            return None, None
        if len(chosen) == 1:
            index = chosen[0]
            return functools.partial(on, index), self.fallback_keys[index]
        keys = self.fallback_keys
        return Fallbacks([(keys[index], functools.partial(on, index)) for index in chosen]), None

    # -- guarded calls -----------------------------------------------------------------
    def execute(
        self,
        key: str,
        call: Callable[[], T],
        fallback: Callable[[int], T] | None = None,
        request: CallRequest[T] | None = None,
        *,
        indices: Sequence[int] | None = None,
    ) -> T:
        """``call()`` under ``key``'s circuit (:meth:`CallPolicy.execute`), with
        ``fallback(index)`` serving per the policy (see :meth:`fallback_plan`), and the
        budget and cache when ``request`` describes the call."""
        return self._run(self.policy.execute, key, call, fallback, request, indices)  # type: ignore[no-any-return]

    def aexecute(
        self,
        key: str,
        call: Callable[[], Awaitable[T]],
        fallback: Callable[[int], Awaitable[T]] | None = None,
        request: CallRequest[T] | None = None,
        *,
        indices: Sequence[int] | None = None,
    ) -> Awaitable[T]:
        """Async :meth:`execute`: the callables return awaitables; so does this."""
        return self._run(self.policy.aexecute, key, call, fallback, request, indices)  # type: ignore[no-any-return]

    def _run(
        self,
        run: Callable[..., Any],
        key: str,
        call: Callable[[], Any],
        fallback: Callable[[int], Any] | None,
        request: CallRequest[Any] | None,
        indices: Sequence[int] | None,
    ) -> Any:
        # One body for both: ``run`` is the policy's execute or aexecute.
        plan, plan_key = (None, None) if fallback is None else self.fallback_plan(fallback, indices)
        if request is None:
            return run(key, call, fallback=plan, fallback_key=plan_key)
        return run(
            key,
            call,
            fallback=plan,
            fallback_key=plan_key,
            budget=self.budget,
            cache=self.cache,
            request=request,
        )

    # -- guarded streams ---------------------------------------------------------------
    def stream(
        self,
        key: str,
        start: Callable[[], Iterable[T]],
        fallback: Callable[[int], Iterable[T]] | None = None,
        *,
        finished: Callable[[T], bool] | None = None,
        fallback_finished: Markers[T] = None,
        indices: Sequence[int] | None = None,
    ) -> Iterator[T]:
        """The stream ``start()`` opens, guarded as one call under ``key``
        (:meth:`CallPolicy.stream`): admission, retry and ``fallback(index)``'s stream
        until the first chunk. ``finished`` tells the chunk carrying the inner model's end
        marker; ``fallback_finished`` the fallbacks' (one check for all, or one per
        fallback of :attr:`fallback_keys`, in order)."""
        return self._stream(  # type: ignore[no-any-return]
            self.policy.stream, key, start, fallback, finished, fallback_finished, indices
        )

    def astream(
        self,
        key: str,
        start: Callable[[], Any],
        fallback: Callable[[int], Any] | None = None,
        *,
        finished: Callable[[T], bool] | None = None,
        fallback_finished: Markers[T] = None,
        indices: Sequence[int] | None = None,
    ) -> Any:
        """Async :meth:`stream` (:meth:`CallPolicy.astream`): ``start()`` and
        ``fallback(index)`` return an async iterable, or an awaitable of one."""
        return self._stream(
            self.policy.astream, key, start, fallback, finished, fallback_finished, indices
        )

    def _stream(
        self,
        run: Callable[..., Any],
        key: str,
        start: Callable[[], Any],
        fallback: Callable[[int], Any] | None,
        finished: Callable[[Any], bool] | None,
        fallback_finished: Markers[Any],
        indices: Sequence[int] | None,
    ) -> Any:
        if fallback is None:
            return run(key, start, finished=finished)
        plan, plan_key = self.fallback_plan(fallback, indices)
        if plan is None:
            return run(key, start, finished=finished)
        markers = fallback_finished
        if markers is not None and not callable(markers):  # one per fallback: the chosen
            chosen = range(len(self.fallback_keys)) if indices is None else indices
            picked = tuple(markers[index] for index in chosen)
            markers = picked if isinstance(plan, Fallbacks) else picked[0]
        return run(
            key,
            start,
            fallback=plan,
            fallback_key=plan_key,
            finished=finished,
            fallback_finished=markers,
        )

    def __repr__(self) -> str:
        return f"ModelGuard(key={self.key!r}, fallback_keys={list(self.fallback_keys)!r})"


def _fallback_keys(
    key: str, identities: list[tuple[str, str]], fallback_key: str | None
) -> tuple[str, ...]:
    """Each fallback's circuit: the first's ``fallback_key`` if given, else derived. None
    may be the inner model's or another fallback's."""
    keys: list[str] = []
    for index, (provider, name) in enumerate(identities):
        found = fallback_key if index == 0 and fallback_key else circuit_key(provider, name)
        if index == 0 and found == key:
            # Sharing the circuit would refuse the fallback whenever the primary is refused.
            raise ValueError(
                f"fallback: its circuit key {key!r} is the inner model's too, so one outage "
                "would refuse both; pass fallback_key= (or key=) to tell them apart"
            )
        if found == key or found in keys:
            raise ValueError(
                f"fallback[{index}]: its circuit key {found!r} is another model's of this "
                "wrapper too; one circuit cannot guard both (give models that differ)"
            )
        keys.append(found)
    return tuple(keys)
