"""The engine options a wrapper takes as its own arguments, declared once.

Every wrapper (LangChain's chat model and embeddings, LlamaIndex's LLM and embedding, the
agent middleware) offers the same :class:`CallPolicy` options as keyword arguments, so
that ``CircuitBreakerChatModel(inner=..., failure_threshold=3)`` needs no policy object.
They are declared here, once: a pydantic wrapper inherits :class:`EngineOptions` (its
fields become the wrapper's); a plain class takes them as ``**options`` and hands them to
:func:`policy_from_options`, which checks their names against the same declaration.

The fields are not validated here (``SkipValidation``): :class:`CallPolicy` and
:class:`BreakerConfig` validate them, naming the field, so the rules (a bool is not a
number of seconds, ...) live in one place. ``None`` means "not given": the engine's
default applies, and a given ``policy`` can be told apart from explicit options.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SkipValidation

from ._classify import Classifier
from ._config import FallbackOn, RetryPolicy
from ._events import Listener
from ._policy import CallPolicy
from ._store import CircuitStore
from ._types import ErrorClass

__all__ = ["ENGINE_OPTIONS", "EngineOptions", "policy_from_options", "takes_engine_options"]

F = TypeVar("F", bound=Callable[..., Any])


class EngineOptions(BaseModel):
    """The :class:`CallPolicy` options of a wrapper, as pydantic fields (a mixin).

    A wrapper inherits it (``class CircuitBreakerLLM(FunctionCallingLLM, EngineOptions)``)
    and builds its policy with ``policy_from_options(policy, self, owner=...)``; the
    fields are fixed once the wrapper is built (its circuits are built from them).
    Durations are seconds or a :class:`~datetime.timedelta`; each field left at ``None``
    takes the engine's default.

    >>> from callpolicy import policy_from_options
    >>> options = EngineOptions(failure_threshold=3, cooldown=10)
    >>> policy_from_options(None, options, owner="Demo").breaker.failure_threshold
    3
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    failure_threshold: SkipValidation[int | None] = Field(default=None, frozen=True)
    """Consecutive counted failures that open the circuit (engine default 5)."""
    cooldown: SkipValidation[float | timedelta | None] = Field(default=None, frozen=True)
    """How long an open circuit refuses calls before a probe (engine default 30 s)."""
    half_open_max_calls: SkipValidation[int | None] = Field(default=None, frozen=True)
    """Probes let through while half-open (engine default 1)."""
    success_threshold: SkipValidation[int | None] = Field(default=None, frozen=True)
    """Successful probes that close the circuit again."""
    failure_rate_threshold: SkipValidation[float | None] = Field(default=None, frozen=True)
    """Opens the circuit when this share of the recent calls failed (off by default)."""
    window_size: SkipValidation[int | None] = Field(default=None, frozen=True)
    """The recent calls the failure rate is measured over."""
    minimum_calls: SkipValidation[int | None] = Field(default=None, frozen=True)
    """Calls in the window before the failure rate counts."""
    cooldown_multiplier: SkipValidation[float | None] = Field(default=None, frozen=True)
    """Growth of the cooldown after each failed probe."""
    max_cooldown: SkipValidation[float | timedelta | None] = Field(default=None, frozen=True)
    """The longest cooldown the multiplier may reach."""
    counted_errors: SkipValidation[frozenset[ErrorClass] | None] = Field(default=None, frozen=True)
    """The error classes that count against the circuit."""
    retry: SkipValidation[RetryPolicy | None] = Field(default=None, frozen=True)
    """A :class:`RetryPolicy`; one attempt when None."""
    fallback_on: SkipValidation[FallbackOn | None] = Field(default=None, frozen=True)
    """``"failure"`` (engine default), ``"open"`` or ``"error"``."""
    classifier: SkipValidation[Classifier | None] = Field(default=None, frozen=True, exclude=True)
    """Replaces :func:`classify_error`."""
    listeners: SkipValidation[Sequence[Listener] | None] = Field(
        default=None, frozen=True, exclude=True
    )
    """Callables receiving every :class:`Event` (sync or async)."""
    listener_timeout: SkipValidation[float | None] = Field(default=None, frozen=True)
    """Seconds an async listener may run before it is cancelled."""
    store: SkipValidation[CircuitStore | None] = Field(default=None, frozen=True, exclude=True)
    """Where circuit state lives (a fresh :class:`MemoryStore` by default)."""


ENGINE_OPTIONS: tuple[str, ...] = tuple(EngineOptions.model_fields)
"""The names of the engine options, in order (the fields of :class:`EngineOptions`)."""


def policy_from_options(
    policy: CallPolicy | None,
    options: EngineOptions | Mapping[str, Any],
    *,
    owner: str,
) -> CallPolicy:
    """The policy a wrapper should use: ``policy`` as given, or one built from ``options``
    (an :class:`EngineOptions`, such as the wrapper itself, or a mapping of option names).

    Options left at ``None`` are not passed on. A name that is not an engine option is a
    TypeError naming it, as an unknown keyword argument would be.
    """
    if isinstance(options, EngineOptions):
        given = {name: getattr(options, name) for name in ENGINE_OPTIONS}
    else:
        unknown = sorted(set(options) - _OPTION_NAMES)
        if unknown:
            raise TypeError(f"{owner}: unexpected keyword argument {unknown[0]!r}")
        given = dict(options)
    chosen = {name: value for name, value in given.items() if value is not None}
    if policy is not None:
        if chosen:
            raise TypeError(
                f"{owner}: pass either policy= or engine options "
                f"({', '.join(sorted(chosen))}), not both; the policy carries its own options"
            )
        if not isinstance(policy, CallPolicy):
            raise TypeError(f"policy: expected a CallPolicy, got {type(policy).__name__}")
        return policy
    return CallPolicy(**chosen)


_OPTION_NAMES = frozenset(ENGINE_OPTIONS)


def takes_engine_options(init: F) -> F:
    """Mark ``init`` (a plain class's ``__init__`` taking ``**options``) as taking the
    engine options: its signature, as ``help()`` and editors show it, lists each one as a
    keyword argument with its type and default (None), in place of ``**options``."""
    signature = inspect.signature(init)
    kept = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    options = [
        inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=field.annotation
        )
        for name, field in EngineOptions.model_fields.items()
    ]
    init.__signature__ = signature.replace(parameters=[*kept, *options])  # type: ignore[attr-defined]
    return init
